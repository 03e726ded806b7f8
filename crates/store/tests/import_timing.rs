//! How fast `import_keys` seeds and `stream_secrets` reads back a large
//! store, on each backend. Measured and printed, never asserted (timings
//! depend on the machine), so these are `#[ignore]`d; run them with
//!
//! ```text
//! VILVIK_KEYS_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo test --release -p vilvik-keys-store --test import_timing -- --ignored --nocapture
//! ```
//!
//! They also print the query plan of the stream, which must not sort: the
//! secrets come in no particular order, so the database may join the two
//! tables whichever way is cheapest (on Postgres, a hash join).

use std::time::{Duration, Instant};

use vilvik_keys_domain::AccountId;
use vilvik_keys_store::{NewKey, PostgresStore, SqliteStore, Store};
use vilvik_keys_test_db::fixtures::{account, actor, new_key, now};
use vilvik_keys_test_db::{TestDatabase, side_client};

const KEYS: usize = 200_000;
const CHUNK: usize = 10_000;
const ACCOUNTS: usize = 1_000;

fn chunks() -> Vec<Vec<NewKey>> {
    let at = now();
    let accounts: Vec<AccountId> = (0..ACCOUNTS)
        .map(|i| account(&format!("acct-{i}")))
        .collect();
    let keys: Vec<NewKey> = (0..KEYS)
        .map(|i| new_key(&accounts[i % ACCOUNTS], &format!("seeded-{i}"), at).0)
        .collect();
    keys.chunks(CHUNK).map(<[NewKey]>::to_vec).collect()
}

/// Imports every chunk, then scans everything back a chunk at a time.
async fn measure(backend: &str, store: &dyn Store) {
    let chunks = chunks();
    let started = Instant::now();
    for chunk in chunks {
        store.import_keys(chunk, &actor()).await.unwrap();
    }
    let imported = started.elapsed();

    let started = Instant::now();
    let mut batches = 0;
    let streamed = store
        .stream_secrets(CHUNK, &mut |entries| {
            assert!(entries.len() <= CHUNK);
            batches += 1;
        })
        .await
        .unwrap();
    let stream = started.elapsed();
    assert_eq!(streamed, KEYS);
    assert_eq!(batches, KEYS.div_ceil(CHUNK));
    assert_eq!(store.change_sequence().await.unwrap(), KEYS as i64);
    report(backend, imported, stream);
}

fn report(backend: &str, imported: Duration, stream: Duration) {
    eprintln!(
        "{backend}: import_keys of {KEYS} keys in chunks of {CHUNK}: {:.2} s ({:.0} keys/s); \
         stream_secrets of all of them in batches of {CHUNK}: {:.2} s ({:.0} keys/s)",
        imported.as_secs_f64(),
        KEYS as f64 / imported.as_secs_f64(),
        stream.as_secs_f64(),
        KEYS as f64 / stream.as_secs_f64(),
    );
}

/// The stream's query, as both backends run it.
const STREAM_QUERY: &str = "SELECT s.prefix, s.hash, s.superseded_at IS NOT NULL, \
     k.revoked_at IS NOT NULL, k.expires_at, k.key_id, k.account_id, k.name, k.scopes, s.pepper_id \
     FROM key_secrets s JOIN keys k ON k.key_id = s.key_id";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a timing report; run with --ignored --nocapture, preferably --release"]
async fn sqlite_import_and_stream_timing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vilvik-keys.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store.migrate().await.unwrap();
    measure("sqlite", &store).await;

    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut stmt = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {STREAM_QUERY}"))
        .unwrap();
    let plan: Vec<String> = stmt
        .query_map([], |r| r.get(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    eprintln!("sqlite stream plan: {plan:?}");
    assert!(
        plan.iter().all(|step| !step.contains("TEMP B-TREE")),
        "{plan:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a timing report; run with --ignored --nocapture, preferably --release"]
async fn postgres_import_and_stream_timing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    measure("postgres", &store).await;

    let client = side_client(db.url()).await;
    // The plan the stream just ran with (statistics as autovacuum left
    // them), then the one it gets once the tables are analyzed.
    for analyzed in [false, true] {
        if analyzed {
            client.batch_execute("ANALYZE").await.unwrap();
        }
        let plan: Vec<String> = client
            .query(&format!("EXPLAIN {STREAM_QUERY}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        eprintln!(
            "postgres stream plan (analyzed: {analyzed}):\n  {}",
            plan.join("\n  ")
        );
        assert!(plan.iter().all(|step| !step.contains("Sort")), "{plan:?}");
    }
}

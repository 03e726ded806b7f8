//! The migration ledger on both backends: every applied file's checksum is
//! recorded, a file changed after it was applied stops the start naming
//! it, and a ledger from before checksums is upgraded in place.
//!
//! The tests reach into `schema_migrations` with a client of their own, as
//! an operator (or an older binary) would.

use vilvik_keys_store::{MIGRATION_COUNT, PostgresStore, SqliteStore, Store, StoreError};
use vilvik_keys_test_db::TestDatabase;

/// The first migration never changes name: later ones are only appended.
const FIRST: &str = "0001_initial.sql";

fn assert_refused_naming_the_first(outcome: vilvik_keys_store::Result<usize>) {
    let err = outcome.expect_err("a changed migration stops the start");
    assert!(matches!(err, StoreError::Internal(..)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "migration {FIRST} was changed after it was applied"
        )),
        "{message}"
    );
}

fn is_hex_checksum(checksum: &str) -> bool {
    checksum.len() == 64 && checksum.bytes().all(|b| b.is_ascii_hexdigit())
}

mod sqlite {
    use super::*;

    async fn migrated() -> (tempfile::TempDir, std::path::PathBuf, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.migrate().await.unwrap(), MIGRATION_COUNT);
        (dir, path, store)
    }

    fn checksums(path: &std::path::Path) -> Vec<Option<String>> {
        let conn = rusqlite::Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT checksum FROM schema_migrations ORDER BY version")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[tokio::test]
    async fn every_applied_migration_has_its_checksum() {
        let (_dir, path, _store) = migrated().await;
        let recorded = checksums(&path);
        assert_eq!(recorded.len(), MIGRATION_COUNT);
        assert!(recorded.iter().flatten().all(|c| is_hex_checksum(c)));
        assert!(recorded.iter().all(Option::is_some));
    }

    #[tokio::test]
    async fn a_changed_migration_stops_the_start_naming_its_file() {
        let (_dir, path, store) = migrated().await;
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE schema_migrations SET checksum = 'not what the file hashes to' WHERE version = 1",
                [],
            )
            .unwrap();
        assert_refused_naming_the_first(store.migrate().await);
        // A fresh process is refused as well.
        let again = SqliteStore::open(&path).await.unwrap();
        assert_refused_naming_the_first(again.migrate().await);
    }

    #[tokio::test]
    async fn a_ledger_from_before_checksums_is_upgraded_in_place() {
        let (_dir, path, store) = migrated().await;
        let expected = checksums(&path);
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute("ALTER TABLE schema_migrations DROP COLUMN checksum", [])
            .unwrap();
        assert_eq!(store.migrate().await.unwrap(), 0);
        assert_eq!(checksums(&path), expected);
        // And from now on a change is caught.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE schema_migrations SET checksum = 'tampered' WHERE version = 1",
                [],
            )
            .unwrap();
        assert_refused_naming_the_first(store.migrate().await);
    }
}

mod postgres {
    use super::*;

    async fn side_client(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    async fn checksums(client: &tokio_postgres::Client) -> Vec<Option<String>> {
        client
            .query(
                "SELECT checksum FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_applied_migration_has_its_checksum() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let store = PostgresStore::connect(db.url()).await.unwrap();
        assert_eq!(store.migrate().await.unwrap(), MIGRATION_COUNT);
        let recorded = checksums(&side_client(db.url()).await).await;
        assert_eq!(recorded.len(), MIGRATION_COUNT);
        assert!(recorded.iter().all(Option::is_some));
        assert!(recorded.iter().flatten().all(|c| is_hex_checksum(c)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_migration_stops_the_start_naming_its_file() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let store = PostgresStore::connect(db.url()).await.unwrap();
        assert_eq!(store.migrate().await.unwrap(), MIGRATION_COUNT);
        side_client(db.url())
            .await
            .execute(
                "UPDATE schema_migrations SET checksum = 'not what the file hashes to' WHERE version = 1",
                &[],
            )
            .await
            .unwrap();
        assert_refused_naming_the_first(store.migrate().await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ledger_from_before_checksums_is_upgraded_in_place() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let store = PostgresStore::connect(db.url()).await.unwrap();
        assert_eq!(store.migrate().await.unwrap(), MIGRATION_COUNT);
        let client = side_client(db.url()).await;
        let expected = checksums(&client).await;
        client
            .batch_execute("ALTER TABLE schema_migrations DROP COLUMN checksum")
            .await
            .unwrap();
        assert_eq!(store.migrate().await.unwrap(), 0);
        assert_eq!(checksums(&client).await, expected);
        client
            .batch_execute("UPDATE schema_migrations SET checksum = 'tampered' WHERE version = 1")
            .await
            .unwrap();
        assert_refused_naming_the_first(store.migrate().await);
    }
}

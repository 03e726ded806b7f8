//! The migration ledger on both backends: every applied file's checksum is
//! recorded, a file changed after it was applied stops the start naming
//! it, and a ledger from before checksums is upgraded in place.
//!
//! The tests reach into `schema_migrations` behind the store's back, as
//! an operator (or an older binary) would.

use vilvik_keys_store::{MIGRATION_COUNT, StoreError};
use vilvik_keys_test_db::TestStore;

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

/// The recorded checksums, in the order the migrations were applied.
async fn checksums(s: &TestStore) -> Vec<Option<String>> {
    s.backend()
        .query_texts("SELECT checksum FROM schema_migrations ORDER BY version")
        .await
}

async fn every_applied_migration_has_its_checksum(s: &TestStore) {
    let recorded = checksums(s).await;
    assert_eq!(recorded.len(), MIGRATION_COUNT);
    assert!(recorded.iter().all(Option::is_some));
    assert!(recorded.iter().flatten().all(|c| is_hex_checksum(c)));
}

async fn a_changed_migration_stops_the_start_naming_its_file(s: &TestStore) {
    s.backend()
        .exec("UPDATE schema_migrations SET checksum = 'not what the file hashes to' WHERE version = 1")
        .await;
    assert_refused_naming_the_first(s.store().migrate().await);
    // A fresh process is refused as well.
    let again = s.backend().open().await;
    assert_refused_naming_the_first(again.migrate().await);
}

async fn a_ledger_from_before_checksums_is_upgraded_in_place(s: &TestStore) {
    let expected = checksums(s).await;
    s.backend()
        .exec("ALTER TABLE schema_migrations DROP COLUMN checksum")
        .await;
    assert_eq!(s.store().migrate().await.unwrap(), 0);
    assert_eq!(checksums(s).await, expected);
    // And from then on a change is caught.
    s.backend()
        .exec("UPDATE schema_migrations SET checksum = 'tampered' WHERE version = 1")
        .await;
    assert_refused_naming_the_first(s.store().migrate().await);
}

vilvik_keys_test_db::on_both_backends!(
    every_applied_migration_has_its_checksum,
    a_changed_migration_stops_the_start_naming_its_file,
    a_ledger_from_before_checksums_is_upgraded_in_place,
);

//! The SQLite database holds key hashes: its files are private to the
//! service's user, whatever the umask, for new and existing databases.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use vilvik_keys_store::Store;
use vilvik_keys_test_db::Backend;
use vilvik_keys_test_db::fixtures::{account, create, now};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The database file and its WAL and shared-memory files.
fn database_files(backend: &Backend) -> [std::path::PathBuf; 3] {
    let path = backend.sqlite_path().expect("a SQLite database");
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    [path.to_owned(), with_suffix("-wal"), with_suffix("-shm")]
}

/// Opens a store on `backend`, as the service starts, and writes a key
/// through it; the store stays open (its WAL and shared memory with it)
/// while the caller holds it.
async fn write_a_key(backend: &Backend) -> Arc<dyn Store> {
    let store = backend.open().await;
    store.migrate().await.unwrap();
    create(&*store, &account("ACME"), "ci-runner", now()).await;
    store
}

#[tokio::test]
async fn a_new_database_and_its_wal_and_shm_are_owner_only() {
    let backend = Backend::sqlite();
    let _open = write_a_key(&backend).await;
    for file in database_files(&backend) {
        assert!(file.exists(), "{} was not created", file.display());
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[tokio::test]
async fn an_existing_database_readable_by_others_is_narrowed() {
    let backend = Backend::sqlite();
    drop(write_a_key(&backend).await);
    for file in database_files(&backend) {
        if file.exists() {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let _open = write_a_key(&backend).await;
    for file in database_files(&backend) {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

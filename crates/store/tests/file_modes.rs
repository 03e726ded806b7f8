//! The SQLite database holds key hashes: its files are private to the
//! service's user, whatever the umask, for new and existing databases.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use vilvik_keys_domain::{Pepper, ScopeSet};
use vilvik_keys_store::{Actor, NewKey, Policy, SqliteStore, Store};

/// Any pepper: these tests store and read hashes, they verify nothing.
fn pepper() -> Pepper {
    Pepper::from_bytes(&[0x42; 32])
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The database file and its WAL and shared-memory files.
fn database_files(path: &Path) -> [std::path::PathBuf; 3] {
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    [path.to_owned(), with_suffix("-wal"), with_suffix("-shm")]
}

async fn write_a_key(store: &SqliteStore) {
    store.migrate().await.unwrap();
    let (new, _) = NewKey::builder("ACME".parse().unwrap())
        .scopes(ScopeSet::parse(&["datasets:read"]).unwrap())
        .build(&pepper());
    let actor = Actor {
        name: "test".to_owned(),
        ip: None,
        operator: true,
    };
    store
        .create_key(new, &actor, &Policy::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_new_database_and_its_wal_and_shm_are_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let store = SqliteStore::open(&path).await.unwrap();
    write_a_key(&store).await;
    for file in database_files(&path) {
        assert!(file.exists(), "{} was not created", file.display());
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[tokio::test]
async fn an_existing_database_readable_by_others_is_narrowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    {
        let store = SqliteStore::open(&path).await.unwrap();
        write_a_key(&store).await;
    }
    for file in database_files(&path) {
        if file.exists() {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let store = SqliteStore::open(&path).await.unwrap();
    write_a_key(&store).await;
    for file in database_files(&path) {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

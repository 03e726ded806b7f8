//! A store of each backend for one test: a SQLite file in a temp dir of
//! its own, or a fresh Postgres database ([`TestDatabase`]), removed when
//! the test ends; and [`on_both_backends!`](crate::on_both_backends),
//! which runs a test written once on each.
//!
//! [`Backend`] also reaches the database behind the store's back, as an
//! operator (or an older binary, or someone tampering) with database
//! access would: [`Backend::exec`] and [`Backend::query_texts`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vilvik_keys_store::{MIGRATION_COUNT, PostgresStore, SqliteStore, Store};

use crate::{TestDatabase, side_client};

/// The database under a test's store; removed when dropped.
#[derive(Debug)]
pub enum Backend {
    /// `vilvik-keys.db` in a temp dir of its own (not created until a
    /// store opens it or SQL runs on it).
    Sqlite {
        path: PathBuf,
        dir: tempfile::TempDir,
    },
    /// A database nobody else uses, on the server tests may use.
    Postgres(TestDatabase),
}

impl Backend {
    /// A SQLite database file in a fresh temp dir.
    pub fn sqlite() -> Backend {
        let dir = tempfile::tempdir().expect("a temp dir");
        Backend::Sqlite {
            path: dir.path().join("vilvik-keys.db"),
            dir,
        }
    }

    /// A fresh Postgres database; `None` (the test skips) under the rules
    /// of [`TestDatabase::create`].
    pub async fn postgres() -> Option<Backend> {
        TestDatabase::create().await.map(Backend::Postgres)
    }

    /// The SQLite file, when this is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Backend::Sqlite { path, .. } => Some(path),
            Backend::Postgres(_) => None,
        }
    }

    /// A store on this database, as a process starting would open it: not
    /// migrated. Each call opens another store (another writer).
    pub async fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite { path, .. } => Arc::new(
                SqliteStore::open(path)
                    .await
                    .expect("the SQLite store opens"),
            ),
            Backend::Postgres(db) => Arc::new(
                PostgresStore::connect(db.url())
                    .await
                    .expect("the Postgres store connects"),
            ),
        }
    }

    /// Runs `sql` (one or more statements) outside the store, as the
    /// database's owner would; panics naming the SQL when it fails.
    pub async fn exec(&self, sql: &str) {
        match self {
            Backend::Sqlite { path, .. } => rusqlite::Connection::open(path)
                .and_then(|conn| conn.execute_batch(sql))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            Backend::Postgres(db) => side_client(db.url())
                .await
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
        }
    }

    /// The first column, as text (`NULL` as `None`), of each row `sql`
    /// returns, queried outside the store.
    pub async fn query_texts(&self, sql: &str) -> Vec<Option<String>> {
        match self {
            Backend::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path).expect("the SQLite file opens");
                let mut statement = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                statement
                    .query_map([], |row| row.get(0))
                    .and_then(Iterator::collect)
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
            Backend::Postgres(db) => side_client(db.url())
                .await
                .query(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|row| row.get(0))
                .collect(),
        }
    }
}

/// A migrated store on a [`Backend`] of its own.
#[derive(Debug)]
pub struct TestStore {
    store: Arc<dyn Store>,
    backend: Backend,
}

impl TestStore {
    /// A migrated store on [`Backend::sqlite`].
    pub async fn sqlite() -> TestStore {
        TestStore::migrated(Backend::sqlite()).await
    }

    /// A migrated store on [`Backend::postgres`]; `None` when the test
    /// skips.
    pub async fn postgres() -> Option<TestStore> {
        Some(TestStore::migrated(Backend::postgres().await?).await)
    }

    /// Opens a store on `backend` and applies every migration, checking
    /// that all of them ran.
    pub async fn migrated(backend: Backend) -> TestStore {
        let store = backend.open().await;
        assert_eq!(
            store.migrate().await.expect("the migrations apply"),
            MIGRATION_COUNT
        );
        TestStore { store, backend }
    }

    /// The store (another handle on it).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The database under the store.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }
}

/// What a test run by [`on_both_backends!`](crate::on_both_backends)
/// takes: the store alone (`Arc<dyn Store>`), or the [`TestStore`] with
/// its backend (`&TestStore`).
pub trait FromTestStore<'a> {
    fn from_test_store(store: &'a TestStore) -> Self;
}

impl<'a> FromTestStore<'a> for Arc<dyn Store> {
    fn from_test_store(store: &'a TestStore) -> Self {
        store.store()
    }
}

impl<'a> FromTestStore<'a> for &'a TestStore {
    fn from_test_store(store: &'a TestStore) -> Self {
        store
    }
}

/// Runs tests written once, each an `async fn` taking an `Arc<dyn Store>`
/// or a `&TestStore` (see [`FromTestStore`]), on each backend: as
/// `sqlite::<test>` on [`TestStore::sqlite`] and `postgres::<test>` on
/// [`TestStore::postgres`] (which skips without a configured server,
/// unless `VILVIK_KEYS_REQUIRE_POSTGRES=1`). Each runs on a runtime of
/// four worker threads.
///
/// The tests are named in the calling module (`on_both_backends!(a, b)`),
/// or by module (`on_both_backends!(keys::{a, b}, audit::{c})`), the test
/// keeping its own name either way.
///
/// Invoke it once per test crate module, at its root (it defines the
/// modules `sqlite` and `postgres` there); the calling crate needs `tokio`
/// with its `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! on_both_backends {
    (@each $(($($path:tt)+) $test:ident),*) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let store = $crate::TestStore::sqlite().await;
                    super::$($path)+($crate::FromTestStore::from_test_store(&store)).await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let Some(store) = $crate::TestStore::postgres().await else {
                        return;
                    };
                    super::$($path)+($crate::FromTestStore::from_test_store(&store)).await;
                }
            )*
        }
    };
    ($($test:ident),* $(,)?) => {
        $crate::on_both_backends!(@each $(($test) $test),*);
    };
    ($($module:ident::{$($test:ident),* $(,)?}),* $(,)?) => {
        $crate::on_both_backends!(@each $($(($module::$test) $test),*),*);
    };
}

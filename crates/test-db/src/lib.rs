//! Test support shared by every test crate of the workspace: a fresh
//! Postgres database for each test, dropped when the test ends, and
//! [`eventually`], the one way a test waits for something that happens in
//! the background.
//!
//! For the store and the verify engine: [`fixtures`], the pepper, actor,
//! policies and keys tests build on, and the calls that arrange a test;
//! [`TestStore`], a migrated store on a [`Backend`] of its own (a SQLite
//! file or a fresh Postgres database), and [`on_both_backends!`], which
//! runs a test written once on each backend.
//!
//! Tests that need Postgres call [`TestDatabase::create`] and connect to
//! [`TestDatabase::url`]. The server to use comes from
//! `VILVIK_KEYS_TEST_DATABASE_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); the database it names is only
//! used to issue `CREATE DATABASE` / `DROP DATABASE`, never for test data.
//!
//! Without that variable the Postgres tests skip themselves (and say so on
//! stderr), so `cargo test` works on a laptop without Postgres. CI sets
//! `VILVIK_KEYS_REQUIRE_POSTGRES=1` so that a missing variable fails instead
//! of silently skipping.
//!
//! Tests that freeze, stop or cut off Postgres never do it to that shared
//! server: they start a [`PrivateCluster`] of their own (`initdb` and
//! `pg_ctl` on a free port in a temp dir, stopped when dropped) and put a
//! [`FaultProxy`] between it and a node to cut that node off. Tests of TLS
//! to Postgres start one with [`PrivateCluster::start_with_tls`].
//!
//! ```no_run
//! # async fn example() {
//! let Some(db) = vilvik_keys_test_db::TestDatabase::create().await else {
//!     return; // skipped: no Postgres configured
//! };
//! let url = db.url(); // a database nobody else uses
//! # let _ = url;
//! # }
//! ```
#![forbid(unsafe_code)]

mod backends;
mod cluster;
mod eventually;
pub mod fixtures;
mod proxy;

use std::fmt;

pub use backends::{Backend, FromTestStore, TestStore};
pub use cluster::{PrivateCluster, ServerTls};
pub use eventually::{POLL_EVERY, block_on, eventually};
pub use proxy::{FaultProxy, ProxyMode};

use tokio_postgres::NoTls;

/// Names the server whose databases tests may create and drop.
pub const URL_VAR: &str = "VILVIK_KEYS_TEST_DATABASE_URL";
/// Set to `1` to make a missing [`URL_VAR`] a failure instead of a skip.
pub const REQUIRE_VAR: &str = "VILVIK_KEYS_REQUIRE_POSTGRES";

/// A database created for one test. Dropping it drops the database, even
/// while other sessions (e.g. a connection pool) are still connected.
pub struct TestDatabase {
    /// The URL given in [`URL_VAR`]; used for `DROP DATABASE`.
    admin_url: String,
    /// The URL of the fresh database.
    url: String,
    name: String,
}

impl TestDatabase {
    /// Creates a database with a unique name on the server named by
    /// `VILVIK_KEYS_TEST_DATABASE_URL`.
    ///
    /// When the variable is unset this prints
    /// `skipped: VILVIK_KEYS_TEST_DATABASE_URL is not set` to stderr and
    /// returns `None`, unless `VILVIK_KEYS_REQUIRE_POSTGRES=1`, in which case
    /// it panics. When it is set but the server cannot be reached, it panics:
    /// a configured Postgres that does not work is a failure, not a skip.
    pub async fn create() -> Option<TestDatabase> {
        let admin_url = match std::env::var(URL_VAR) {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                if std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1") {
                    panic!(
                        "{REQUIRE_VAR}=1 but {URL_VAR} is not set: point it at a Postgres server \
                         whose user may create databases, e.g. {URL_VAR}=postgres://postgres@127.0.0.1:5432/postgres"
                    );
                }
                eprintln!("skipped: {URL_VAR} is not set");
                return None;
            }
        };
        let name = unique_name();
        let url = with_database(&admin_url, &name);
        let client = side_client(&admin_url).await;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name} via {URL_VAR}: {e}"));
        Some(TestDatabase {
            admin_url,
            url,
            name,
        })
    }

    /// The URL of the fresh database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The name of the fresh database.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Makes the server refuse new connections to `database` and ends every
/// session it has (`allow` false), or accept them again (`allow` true):
/// an outage of that one database, caused for real, through the server
/// named by [`URL_VAR`].
pub async fn allow_connections(database: &str, allow: bool) {
    let url = std::env::var(URL_VAR).unwrap_or_else(|_| panic!("{URL_VAR} is not set"));
    let client = side_client(&url).await;
    client
        .batch_execute(&format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS {allow}"
        ))
        .await
        .unwrap_or_else(|e| panic!("cannot set ALLOW_CONNECTIONS on {database}: {e}"));
    if !allow {
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&database],
            )
            .await
            .unwrap_or_else(|e| panic!("cannot end the sessions of {database}: {e}"));
    }
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password; the name is enough to find it.
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for TestDatabase {
    /// Drops the database on a thread of its own with its own runtime, so
    /// that it works whether or not it is dropped inside a tokio runtime
    /// (blocking inside one is not allowed).
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start a runtime: {e}"))?;
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&admin_url, NoTls)
                    .await
                    .map_err(|e| format!("cannot connect: {e}"))?;
                let connection = tokio::spawn(connection);
                let dropped = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await
                    .map_err(|e| e.to_string());
                drop(client);
                let _ = connection.await;
                dropped
            })
        })
        .join();
        let problem = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(_) => "the drop thread panicked".to_owned(),
        };
        // Never panic in drop: it would abort a test that is already unwinding.
        eprintln!(
            "warning: test database {} was not dropped: {problem}",
            self.name
        );
    }
}

/// A plain connection to `url` (no TLS), driven by a task on the current
/// runtime until the client is dropped: for looking at or acting on a
/// database from the side, as an operator would. Panics when it cannot
/// connect.
pub async fn side_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to a test database: {e}"));
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("a side connection to a test database failed: {e}");
        }
    });
    client
}

/// `vk_test_<pid>_<16 hex digits>`: unique across processes and tests, and a
/// plain identifier (lowercase, no quoting surprises).
fn unique_name() -> String {
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).expect("the OS random number generator works");
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("vk_test_{}_{hex}", std::process::id())
}

/// `url` with its database replaced by `name`. Handles URLs
/// (`postgres://user@host:port/db?opts`) and key=value strings.
fn with_database(url: &str, name: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // key=value form: a later `dbname` wins.
        return format!("{url} dbname={name}");
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let query_start = rest.find('?').unwrap_or(rest.len());
    let authority_end = rest[..query_start].find('/').unwrap_or(query_start);
    format!(
        "{}{}/{name}{}",
        &url[..rest_start],
        &rest[..authority_end],
        &rest[query_start..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/test?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgresql://h:5432", "x"),
            "postgresql://h:5432/x"
        );
        assert_eq!(
            with_database("postgres://h?connect_timeout=5", "x"),
            "postgres://h/x?connect_timeout=5"
        );
        assert_eq!(
            with_database("host=h user=u dbname=test", "x"),
            "host=h user=u dbname=test dbname=x"
        );
    }

    #[test]
    fn names_are_unique_plain_identifiers() {
        let (a, b) = (unique_name(), unique_name());
        assert_ne!(a, b);
        assert!(a.starts_with("vk_test_"));
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        );
    }

    #[tokio::test]
    async fn creates_and_drops_a_database() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let name = db.name().to_owned();
        let client = side_client(db.url()).await;
        let current: String = client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(current, name);
        let admin = side_client(&db.admin_url).await;
        // Dropped inside a runtime, with a session still open.
        drop(db);
        let left = admin
            .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await
            .unwrap();
        assert!(left.is_empty(), "{name} was not dropped");
        drop(client);
    }
}

//! The embedded backend: one SQLite file in WAL mode.
//!
//! rusqlite is blocking, so every call runs on tokio's blocking pool. One
//! connection writes and one reads: WAL lets the reader see every committed
//! write without waiting for the writer. Write transactions start with
//! `BEGIN IMMEDIATE`, which takes SQLite's single write lock up front, so
//! the cap check and the insert it guards cannot interleave with another
//! writer, even one in another process (e.g. `vilvik-keys bootstrap`).
//!
//! The operations of `ops.rs` are async, written once for both backends;
//! here they run on the blocking thread that holds the connection, and
//! since no primitive of this backend ever waits, each is complete when
//! first polled ([`complete`]).
//!
//! Where things are: the connections, their runners and the calls of the
//! verify engine here; the primitives of `db.rs` by the tables they serve
//! (`keys.rs`, `accounts.rs`, `requests.rs`, `audit.rs`, `feed.rs`); the
//! migration ledger in `ledger.rs`.

mod accounts;
mod audit;
mod feed;
mod keys;
mod ledger;
mod requests;

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use rusqlite::{Connection, params};
use time::OffsetDateTime;
use vilvik_keys_domain::{KeyPrefix, PepperId};

use crate::backend::{Backend, Stream};
use crate::db::{BoxFuture, Fut};
use crate::rows::{self, Cells};
use crate::rules::corrupt;
use crate::{
    ChangeListener, Missing, OpenExistingError, OutageKind, PepperUse, Rehash, Result,
    SecretRecord, StoreError, UsageRecord, stream,
};

/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, true).await
    }

    /// Opens the database file at `path` only if it exists and holds the
    /// service's schema (a migration ledger with at least one entry):
    /// nothing is created, so a command run in the wrong directory makes
    /// no empty store there.
    pub async fn open_existing(path: &Path) -> Result<Self, OpenExistingError> {
        let no_file = || OpenExistingError::Missing(Missing::NoFile(path.to_owned()));
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(no_file()),
            _ => {}
        }
        // Looked at read-only first: a file that is not the service's
        // store is left exactly as it was.
        let at = path.to_owned();
        let migrated = tokio::task::spawn_blocking(move || has_schema(&at))
            .await
            .map_err(|e| StoreError::internal_from("SQLite open task failed", e))?;
        match migrated {
            Ok(true) => {}
            Ok(false) => return Err(OpenExistingError::Missing(Missing::NoSchema)),
            // Removed between the look and the open.
            Err(_) if !path.exists() => return Err(no_file()),
            Err(e) => return Err(e.into()),
        }
        Ok(Self::open_with(path, false).await?)
    }

    async fn open_with(path: &Path, create: bool) -> Result<Self> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            make_private(&path, create)?;
            let writer = open_connection(&path, create)?;
            writer
                .pragma_update(None, "journal_mode", "WAL")
                .map_err(|e| {
                    StoreError::internal_from(format!("cannot enable WAL on {}", path.display()), e)
                })?;
            let reader = open_connection(&path, create)?;
            Ok(Self {
                writer: Arc::new(Mutex::new(writer)),
                reader: Arc::new(Mutex::new(reader)),
            })
        })
        .await
        .map_err(|e| StoreError::internal_from("SQLite open task failed", e))?
    }

    /// Runs `f` on a blocking thread in a `BEGIN IMMEDIATE` transaction on
    /// the writer; commits when `f` returns `Ok`.
    async fn transaction<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Sqlite<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        on(&self.writer, move |conn| {
            let mut tx = Sqlite::begin(conn)?;
            let out = f(&mut tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// Runs `f` on a blocking thread with the reader connection.
    async fn on_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Sqlite<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        on(&self.reader, move |conn| f(&mut Sqlite(conn))).await
    }
}

/// Runs `f` with `conn` on tokio's blocking pool. A connection whose
/// holder panicked is used on: [`Sqlite`] rolled back whatever it left open.
async fn on<T: Send + 'static>(
    conn: &Arc<Mutex<Connection>>,
    f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
) -> Result<T> {
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || f(&mut conn.lock().unwrap_or_else(|p| p.into_inner())))
        .await
        .map_err(|e| StoreError::internal_from("SQLite task failed", e))?
}

/// One of the store's connections as the primitives of `db.rs` use it:
/// the writer inside a `BEGIN IMMEDIATE` transaction, or the reader.
/// Dropped with a transaction still open (an error, a panic), it rolls
/// the transaction back, so the connection goes back clean.
pub(crate) struct Sqlite<'c>(&'c mut Connection);

impl<'c> Sqlite<'c> {
    fn begin(conn: &'c mut Connection) -> Result<Self> {
        conn.execute_batch("BEGIN IMMEDIATE").map_err(map_err)?;
        Ok(Self(conn))
    }

    fn commit(self) -> Result<()> {
        self.0.execute_batch("COMMIT").map_err(map_err)
    }
}

impl Drop for Sqlite<'_> {
    fn drop(&mut self) {
        if !self.0.is_autocommit() {
            let _ = self.0.execute_batch("ROLLBACK");
        }
    }
}

impl Deref for Sqlite<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.0
    }
}

impl DerefMut for Sqlite<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.0
    }
}

impl crate::db::Db for Sqlite<'_> {
    /// SQLite has no statement timeout.
    async fn lift_statement_timeout(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Drives an operation of `ops.rs` to its end on this blocking thread. No
/// primitive of this backend waits, so it is complete when first polled;
/// one that is not is a bug, reported as such.
fn complete<T>(op: impl Future<Output = Result<T>>) -> Result<T> {
    op.now_or_never().unwrap_or_else(|| {
        Err(StoreError::internal(
            "a SQLite operation did not complete on its thread (a primitive waited)",
        ))
    })
}

/// The database holds key hashes and account data: only the service's
/// user may read it. A new file is created 0600 before SQLite opens it
/// (the umask can only take bits away), and SQLite gives its `-wal` and
/// `-shm` files the database file's mode. An existing database, WAL or
/// shared-memory file that others may read is narrowed to its owner.
fn make_private(path: &Path, create: bool) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let cannot = |what: &str, e: std::io::Error| {
        StoreError::internal_from(format!("cannot {what} {}", path.display()), e)
    };
    match create.then(|| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    }) {
        Some(Ok(_)) => return Ok(()),
        Some(Err(e)) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(cannot("create SQLite database", e));
        }
        _ => {}
    }
    let mut files = vec![path.to_owned()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        files.push(name.into());
    }
    for file in files {
        let Ok(meta) = std::fs::metadata(&file) else {
            continue; // no such file (yet)
        };
        let mode = meta.permissions().mode();
        if meta.is_file() && mode & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & 0o700))
                .map_err(|e| cannot("make private", e))?;
            tracing::warn!(
                file = %file.display(),
                was = format!("{:o}", mode & 0o777),
                "the SQLite file was readable by others: narrowed to owner only"
            );
        }
    }
    Ok(())
}

/// Whether the file at `path` holds the service's schema: a migration
/// ledger with at least one entry. Read through a read-only connection.
fn has_schema(path: &Path) -> Result<bool> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| {
        StoreError::internal_from(format!("cannot open SQLite database {}", path.display()), e)
    })?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(map_err)?;
    let ledger: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master \
             WHERE type = 'table' AND name = 'schema_migrations')",
            [],
            |r| r.get(0),
        )
        .map_err(map_err)?;
    if !ledger {
        return Ok(false);
    }
    conn.query_row("SELECT EXISTS (SELECT 1 FROM schema_migrations)", [], |r| {
        r.get(0)
    })
    .map_err(map_err)
}

/// A connection to the file at `path`; without `create`, a missing file
/// is an error rather than a new empty database.
fn open_connection(path: &Path, create: bool) -> Result<Connection> {
    use rusqlite::OpenFlags;
    let mut flags = OpenFlags::default();
    if !create {
        flags.remove(OpenFlags::SQLITE_OPEN_CREATE);
    }
    let conn = Connection::open_with_flags(path, flags).map_err(|e| {
        StoreError::internal_from(format!("cannot open SQLite database {}", path.display()), e)
    })?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(map_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(map_err)?;
    // FULL: in WAL mode each commit syncs the WAL before it returns, so an
    // acknowledged change survives power loss (NORMAL may lose the last
    // commits). Admin writes are rare next to verifies, which never write
    // synchronously.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(map_err)?;
    Ok(conn)
}

fn map_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::unavailable(OutageKind::Busy, e)
        }
        Some(ErrorCode::ConstraintViolation) if e.to_string().contains("UNIQUE") => {
            StoreError::Conflict
        }
        _ => StoreError::internal_from("SQLite statement failed", e),
    }
}

/// Times are stored as INTEGER microseconds since the Unix epoch, UTC.
/// A count as SQLite's `INTEGER` holds it (one flush never nears the limit).
fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_micros(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000) as i64
}

fn from_micros(micros: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .map_err(|e| StoreError::internal_from("stored time out of range", e))
}

impl Cells for rusqlite::Row<'_> {
    fn opt_text(&self, i: usize) -> Result<Option<&str>> {
        let cell = self.get_ref(i).map_err(map_err)?;
        cell.as_str_or_null()
            .map_err(|e| StoreError::internal_from("SQLite column is not text", e))
    }

    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        self.get(i).map_err(map_err)
    }

    fn flag(&self, i: usize) -> Result<bool> {
        self.get(i).map_err(map_err)
    }

    /// INTEGER microseconds since the Unix epoch.
    fn opt_time(&self, i: usize) -> Result<Option<OffsetDateTime>> {
        self.opt_int(i)?.map(from_micros).transpose()
    }

    fn opt_bytes(&self, i: usize) -> Result<Option<&[u8]>> {
        let cell = self.get_ref(i).map_err(map_err)?;
        cell.as_blob_or_null()
            .map_err(|e| StoreError::internal_from("SQLite column is not a blob", e))
    }

    /// A JSON array of strings. Scopes and scope patterns never hold a
    /// character JSON escapes, so they borrow.
    fn opt_strings(&self, i: usize) -> Result<Option<Vec<&str>>> {
        let Some(json) = self.opt_text(i)? else {
            return Ok(None);
        };
        serde_json::from_str(json).map_err(|e| corrupt("JSON list")(format!("column {i}: {e}")))
    }

    /// JSON text.
    fn json(&self, i: usize) -> Result<serde_json::Value> {
        serde_json::from_str(self.text(i)?).map_err(|e| corrupt("JSON")(format!("column {i}: {e}")))
    }
}

impl Backend for SqliteStore {
    type Tx<'c> = Sqlite<'c>;
    type Conn<'c> = Sqlite<'c>;

    fn write<T, F>(&self, op: F) -> impl Fut<T>
    where
        T: Send + 'static,
        F: for<'t, 'c> FnOnce(&'t mut Sqlite<'c>) -> BoxFuture<'t, T> + Send + 'static,
    {
        self.transaction(move |tx| complete(op(tx)))
    }

    fn read<T, F>(&self, op: F) -> impl Fut<T>
    where
        T: Send + 'static,
        F: for<'t, 'c> FnOnce(&'t mut Sqlite<'c>) -> BoxFuture<'t, T> + Send + 'static,
    {
        self.on_reader(move |conn| complete(op(conn)))
    }

    fn migrate(&self) -> impl Fut<usize> {
        self.transaction(ledger::migrate)
    }

    async fn find_secret(&self, prefix: &KeyPrefix) -> Result<Option<SecretRecord>> {
        let prefix = prefix.clone();
        self.on_reader(move |conn| keys::find_secret(conn, &prefix))
            .await
    }

    /// Up to three prepared `UPDATE`s per key (the counts, the last valid
    /// use if newer, the last rejected use if newer) in one `BEGIN
    /// IMMEDIATE` transaction.
    async fn record_usage(&self, usage: &[UsageRecord]) -> Result<()> {
        let usage = usage.to_vec();
        self.transaction(move |tx| {
            let mut counts = tx
                .prepare_cached(
                    "UPDATE keys SET valid_uses = valid_uses + ?1, \
                     rejected_uses = rejected_uses + ?2 WHERE key_id = ?3",
                )
                .map_err(map_err)?;
            for u in &usage {
                let (valid, rejected) = (count(u.valid_uses), count(u.rejected_uses));
                counts
                    .execute(params![valid, rejected, u.key_id.as_str()])
                    .map_err(map_err)?;
            }
            let mut valid = tx
                .prepare_cached(
                    "UPDATE keys SET last_used_at = ?1, \
                     last_used_ip = COALESCE(?3, ?2), \
                     last_used_observed_ip = ?2, last_used_claimed_ip = ?3 \
                     WHERE key_id = ?4 AND (last_used_at IS NULL OR last_used_at < ?1)",
                )
                .map_err(map_err)?;
            for (u, seen) in usage.iter().filter_map(|u| Some((u, u.valid.as_ref()?))) {
                valid
                    .execute(params![
                        to_micros(seen.at),
                        seen.observed_ip,
                        seen.claimed_ip,
                        u.key_id.as_str()
                    ])
                    .map_err(map_err)?;
            }
            let mut rejected = tx
                .prepare_cached(
                    "UPDATE keys SET last_rejected_at = ?1, last_rejected_ip = ?2 \
                     WHERE key_id = ?3 AND (last_rejected_at IS NULL OR last_rejected_at < ?1)",
                )
                .map_err(map_err)?;
            for (u, seen) in usage.iter().filter_map(|u| Some((u, u.rejected.as_ref()?))) {
                rejected
                    .execute(params![
                        to_micros(seen.at),
                        seen.observed_ip,
                        u.key_id.as_str()
                    ])
                    .map_err(map_err)?;
            }
            Ok(())
        })
        .await
    }

    /// One prepared `UPDATE` per secret, in one `BEGIN IMMEDIATE`
    /// transaction; `IS` compares the pepper id NULL-safely.
    async fn rehash_secrets(&self, rehashes: &[Rehash]) -> Result<Vec<KeyPrefix>> {
        let rehashes = rehashes.to_vec();
        self.transaction(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE key_secrets SET hash = ?1, pepper_id = ?2 \
                     WHERE prefix = ?3 AND hash = ?4 AND pepper_id IS ?5",
                )
                .map_err(map_err)?;
            let mut done = Vec::new();
            for r in &rehashes {
                let changed = stmt
                    .execute(params![
                        &r.new_hash.as_bytes()[..],
                        r.new_pepper_id.to_stored(),
                        r.prefix.as_str(),
                        &r.old_hash.as_bytes()[..],
                        r.old_pepper_id.map(PepperId::to_stored),
                    ])
                    .map_err(map_err)?;
                if changed > 0 {
                    done.push(r.prefix.clone());
                }
            }
            Ok(done)
        })
        .await
    }

    /// Always `None`. SQLite has no way to tell one connection, let alone
    /// another process, that a transaction committed, and an in-process
    /// broadcast would miss writes from other processes on the same file
    /// (e.g. `vilvik-keys bootstrap` while the server runs). The change
    /// log is the one complete source: followers poll
    /// [`crate::KeySource::changes_since`], an indexed read of the
    /// `key_changes` primary key that costs nothing when nothing changed.
    async fn listen(&self) -> Result<Option<Box<dyn ChangeListener>>> {
        Ok(None)
    }

    async fn stream(&self, batch: usize, stream: Stream<'_>) -> Result<usize> {
        use rusqlite::types::Value;
        match stream {
            Stream::Secrets(sink) => {
                let decode = |row: &rusqlite::Row<'_>| rows::entry(row);
                let query = stream::STREAM_SECRETS;
                self.stream_rows(query, Vec::new(), batch, decode, sink)
                    .await
            }
            Stream::Prefixes(sink) => {
                let decode = |row: &rusqlite::Row<'_>| rows::prefix(row);
                let query = stream::STREAM_PREFIXES;
                self.stream_rows(query, Vec::new(), batch, decode, sink)
                    .await
            }
            Stream::AuditChain(account, sink) => {
                let decode = |row: &rusqlite::Row<'_>| rows::chain_row(row);
                let account = account.map_or(Value::Null, |a| Value::Text(a.as_str().to_owned()));
                let query = audit::AUDIT_CHAIN;
                self.stream_rows(query, vec![account], batch, decode, sink)
                    .await
            }
        }
    }

    async fn secrets_by_pepper(&self) -> Result<Vec<PepperUse>> {
        self.on_reader(|conn| {
            let mut stmt = conn
                .prepare_cached(stream::SECRETS_BY_PEPPER)
                .map_err(map_err)?;
            let mut found = stmt.query([]).map_err(map_err)?;
            let mut uses = Vec::new();
            while let Some(row) = found.next().map_err(map_err)? {
                uses.push(rows::pepper_use(row)?);
            }
            Ok(uses)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Durability is a setting of each connection, not of the file: both
    /// of the store's must sync every commit.
    #[tokio::test]
    async fn every_connection_syncs_each_commit_to_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("durable.db"))
            .await
            .unwrap();
        for (name, conn) in [("writer", &store.writer), ("reader", &store.reader)] {
            let conn = conn.lock().unwrap();
            let synchronous: i64 = conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap();
            assert_eq!(synchronous, 2, "{name}: synchronous is not FULL");
            let journal: String = conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(journal, "wal", "{name}");
        }
    }
}

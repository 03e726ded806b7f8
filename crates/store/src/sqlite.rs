//! The embedded backend: one SQLite file in WAL mode.
//!
//! rusqlite is blocking, so every call runs on tokio's blocking pool. One
//! connection writes and one reads: WAL lets the reader see every committed
//! write without waiting for the writer. Write transactions start with
//! `BEGIN IMMEDIATE`, which takes SQLite's single write lock up front, so
//! the cap check and the insert it guards cannot interleave with another
//! writer, even one in another process (e.g. `vilvik-keys bootstrap`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use vilvik_keys_domain::{
    AccountId, KeyId, KeyPrefix, PepperId, ScopeCatalogue, ScopeSet, SecretHash, Tier, TierLimits,
};

use crate::chain::{self, Head};
use crate::migrate::{self, Applied, CREATE_LEDGER, Migration, SQLITE};
use crate::rules::{self, ChangeRecord, Prune, RawKey, corrupt, page};
use crate::stream;
use crate::{
    Account, Actor, AuditChainRow, AuditEvent, KeyChanges, KeyRecord, KeySource, NewKey, NewSecret,
    OutageKind, Outcome, Page, PepperUse, Policy, Rehash, Replay, RequestRecord, Result, Rotation,
    RotationRequest, SecretEntry, SecretRecord, Store, StoreError, StoredAuditEvent,
    StoredAuditHead, UsageRecord,
};

/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const KEY_COLUMNS: &str = key_columns!();

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
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            make_private(&path)?;
            let writer = open_connection(&path)?;
            writer
                .pragma_update(None, "journal_mode", "WAL")
                .map_err(|e| {
                    StoreError::internal_from(format!("cannot enable WAL on {}", path.display()), e)
                })?;
            let reader = open_connection(&path)?;
            Ok(Self {
                writer: Arc::new(Mutex::new(writer)),
                reader: Arc::new(Mutex::new(reader)),
            })
        })
        .await
        .map_err(|e| StoreError::internal_from("SQLite open task failed", e))?
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.writer.clone();
        run_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(map_err)?;
            let out = f(&tx)?;
            tx.commit().map_err(map_err)?;
            Ok(out)
        })
        .await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.reader.clone();
        run_blocking(move || f(&conn.lock().unwrap_or_else(|p| p.into_inner()))).await
    }
}

/// The database holds key hashes and account data: only the service's
/// user may read it. A new file is created 0600 before SQLite opens it
/// (the umask can only take bits away), and SQLite gives its `-wal` and
/// `-shm` files the database file's mode. An existing database, WAL or
/// shared-memory file that others may read is narrowed to its owner.
fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let cannot = |what: &str, e: std::io::Error| {
        StoreError::internal_from(format!("cannot {what} {}", path.display()), e)
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(cannot("create SQLite database", e)),
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

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(|e| {
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

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::internal_from("SQLite task failed", e))?
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

fn to_micros(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000) as i64
}

fn from_micros(micros: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .map_err(|e| StoreError::internal_from("stored time out of range", e))
}

fn opt_from_micros(micros: Option<i64>) -> Result<Option<OffsetDateTime>> {
    micros.map(from_micros).transpose()
}

/// Reads the columns of [`KEY_COLUMNS`] starting at `offset`.
fn key_from_row(row: &Row<'_>, offset: usize) -> Result<KeyRecord> {
    let get_text = |i: usize| row.get::<_, String>(offset + i).map_err(map_err);
    let get_time = |i: usize| opt_from_micros(row.get(offset + i).map_err(map_err)?);
    let scopes_json = get_text(4)?;
    RawKey {
        key_id: get_text(0)?,
        account_id: get_text(1)?,
        name: get_text(2)?,
        description: get_text(3)?,
        scopes: serde_json::from_str(&scopes_json).map_err(|e| corrupt("scopes")(e.to_string()))?,
        prefix: get_text(5)?,
        created_at: from_micros(row.get(offset + 6).map_err(map_err)?)?,
        expires_at: get_time(7)?,
        revoked_at: get_time(8)?,
        revoke_reason: row.get(offset + 9).map_err(map_err)?,
        rotated_at: get_time(10)?,
        last_used_at: get_time(11)?,
        last_used_ip: row.get(offset + 12).map_err(map_err)?,
        version: row.get(offset + 13).map_err(map_err)?,
    }
    .parse()
}

fn scopes_json(scopes: &ScopeSet) -> String {
    serde_json::to_string(&scopes.to_strings()).expect("a list of strings serializes")
}

fn load_key(conn: &Connection, account: &AccountId, key_id: &KeyId) -> Result<Option<KeyRecord>> {
    conn.query_row(
        &format!("SELECT {KEY_COLUMNS} FROM keys k WHERE k.account_id = ?1 AND k.key_id = ?2"),
        params![account.as_str(), key_id.as_str()],
        |row| Ok(key_from_row(row, 0)),
    )
    .optional()
    .map_err(map_err)?
    .transpose()
}

/// The key to change; refuses a revoked key, and one no longer at
/// `if_version`.
fn load_key_for_change(
    tx: &Transaction<'_>,
    account: &AccountId,
    key_id: &KeyId,
    if_version: Option<i64>,
) -> Result<KeyRecord> {
    let key = load_key(tx, account, key_id)?.ok_or(StoreError::NotFound)?;
    rules::ensure_not_revoked(&key)?;
    rules::check_version(&key, if_version)?;
    Ok(key)
}

/// Records `request` for its retries, unless its id is already recorded
/// (and its window still open): then what the first call did, or a
/// refusal when that call was another. The write lock `BEGIN IMMEDIATE`
/// took makes the look-up and the insert one step.
fn claim_request(
    tx: &Transaction<'_>,
    account: &AccountId,
    request: &RequestRecord,
    now: OffsetDateTime,
) -> Result<Option<Replay>> {
    tx.prepare_cached(
        "DELETE FROM requests WHERE account_id = ?1 AND request_digest = ?2 AND expires_at <= ?3",
    )
    .map_err(map_err)?
    .execute(params![
        account.as_str(),
        &request.digest[..],
        to_micros(now)
    ])
    .map_err(map_err)?;
    let stored = tx
        .prepare_cached(
            "SELECT method, params_digest, key_id, sealed_secret, pepper_id FROM requests \
             WHERE account_id = ?1 AND request_digest = ?2",
        )
        .map_err(map_err)?
        .query_row(params![account.as_str(), &request.digest[..]], |r| {
            Ok(rules::StoredRequest {
                method: r.get(0)?,
                params: r.get(1)?,
                key_id: r.get(2)?,
                sealed: r.get(3)?,
                pepper_id: r.get(4)?,
            })
        })
        .optional()
        .map_err(map_err)?;
    if let Some(stored) = stored {
        let (key_id, sealed, pepper_id) = rules::replayed(stored, request)?;
        let key = load_key(tx, account, &key_id)?
            .ok_or_else(|| StoreError::internal("a request id names a key that is gone"))?;
        return Ok(Some(Replay {
            key,
            sealed,
            pepper_id,
        }));
    }
    tx.prepare_cached(
        "INSERT INTO requests (account_id, request_digest, method, params_digest, key_id, \
         sealed_secret, pepper_id, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .map_err(map_err)?
    .execute(params![
        account.as_str(),
        &request.digest[..],
        request.method.as_str(),
        &request.params[..],
        request.key_id.as_str(),
        request.sealed,
        request.pepper_id.to_stored(),
        to_micros(request.expires_at),
    ])
    .map_err(map_err)?;
    Ok(None)
}

/// Creates the account on first use; returns it as stored.
fn ensure_account(
    tx: &Transaction<'_>,
    account: &AccountId,
    now: OffsetDateTime,
) -> Result<Account> {
    tx.execute(
        "INSERT INTO accounts (account_id, tier, created_at) VALUES (?1, 'free', ?2) ON CONFLICT DO NOTHING",
        params![account.as_str(), to_micros(now)],
    )
    .map_err(map_err)?;
    load_account(tx, account)
}

fn load_account(conn: &Connection, account: &AccountId) -> Result<Account> {
    let stored: Option<(String, Option<String>)> = conn
        .query_row(
            "SELECT tier, grantable_scopes FROM accounts WHERE account_id = ?1",
            [account.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(map_err)?;
    let stored = match stored {
        Some((tier, Some(json))) => Some((tier, Some(parse_json_list("grantable scopes", &json)?))),
        Some((tier, None)) => Some((tier, None)),
        None => None,
    };
    rules::account(stored)
}

fn parse_json_list(what: &str, json: &str) -> Result<Vec<String>> {
    serde_json::from_str(json).map_err(|e| corrupt(what)(e.to_string()))
}

fn check_room(
    tx: &Transaction<'_>,
    account: &AccountId,
    tier: Tier,
    now: OffsetDateTime,
    limits: TierLimits,
) -> Result<()> {
    let active: u32 = tx
        .query_row(
            "SELECT COUNT(*) FROM keys WHERE account_id = ?1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > ?2)",
            params![account.as_str(), to_micros(now)],
            |r| r.get(0),
        )
        .map_err(map_err)?;
    rules::check_quota(tier, limits, active)
}

/// Refuses to revoke or weaken `key` (an active management key) when no
/// other active key of its account is one. Writes are serialized, so no
/// concurrent change can take the other one away meanwhile.
fn keep_a_manager(tx: &Transaction<'_>, key: &KeyRecord, now: OffsetDateTime) -> Result<()> {
    let mut stmt = tx
        .prepare_cached(
            "SELECT scopes FROM keys WHERE account_id = ?1 AND key_id <> ?2 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > ?3)",
        )
        .map_err(map_err)?;
    let lists = stmt
        .query_map(
            params![key.account_id.as_str(), key.key_id.as_str(), to_micros(now)],
            |r| r.get::<_, String>(0),
        )
        .map_err(map_err)?
        .map(|json| parse_json_list("scopes", &json.map_err(map_err)?))
        .collect::<Result<Vec<_>>>()?;
    rules::check_not_last_manager(key, rules::count_managers(&lists)?)
}

/// Writes a new key, its first secret, its `created` event and its change.
/// Statements are cached: [`Store::import_keys`] runs this per key.
fn insert_new_key(tx: &Transaction<'_>, new: &NewKey, actor: &Actor) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO keys (key_id, account_id, name, description, scopes, prefix, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .map_err(map_err)?
    .execute(params![
        new.key_id.as_str(),
        new.account_id.as_str(),
        new.name.as_str(),
        new.description.as_str(),
        scopes_json(&new.scopes),
        new.prefix.as_str(),
        to_micros(new.created_at),
        new.expires_at.map(to_micros),
    ])
    .map_err(map_err)?;
    let secret = NewSecret {
        prefix: new.prefix.clone(),
        hash: new.hash,
        pepper_id: new.pepper_id,
    };
    insert_secret(tx, &secret, &new.key_id, new.created_at)?;
    record_change(tx, &ChangeRecord::created(new, actor))
}

/// Deletes a key's rotated-away secrets but the newest `?2`.
const PRUNE_KEY_SECRETS: &str = "DELETE FROM key_secrets WHERE key_id = ?1 AND superseded_at IS NOT NULL \
     AND prefix NOT IN (SELECT prefix FROM key_secrets WHERE key_id = ?1 AND superseded_at IS NOT NULL \
     ORDER BY superseded_at DESC, rowid DESC LIMIT ?2) RETURNING prefix";

/// The prefixes a `DELETE … RETURNING prefix` of secrets returned.
fn deleted_prefixes(
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<KeyPrefix>> {
    let mut rows = stmt.query(params).map_err(map_err)?;
    let mut prefixes = Vec::new();
    while let Some(row) = rows.next().map_err(map_err)? {
        prefixes.push(prefix_from_row(row)?);
    }
    Ok(prefixes)
}

fn insert_secret(
    tx: &Transaction<'_>,
    secret: &NewSecret,
    key_id: &KeyId,
    at: OffsetDateTime,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO key_secrets (prefix, key_id, hash, pepper_id, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(map_err)?
    .execute(params![
        secret.prefix.as_str(),
        key_id.as_str(),
        &secret.hash.as_bytes()[..],
        secret.pepper_id.to_stored(),
        to_micros(at)
    ])
    .map_err(map_err)?;
    Ok(())
}

/// Writes the change's audit event, chained onto the account's head (the
/// write lock `BEGIN IMMEDIATE` took keeps anyone else from appending
/// meanwhile), moves the head, and appends its prefixes to the change log.
fn record_change(tx: &Transaction<'_>, record: &ChangeRecord<'_>) -> Result<()> {
    let head = tx
        .prepare_cached("SELECT last_seq, last_hash FROM audit_heads WHERE account_id = ?1")
        .map_err(map_err)?
        .query_row([record.account.as_str()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .optional()
        .map_err(map_err)?
        .map(|(seq, hash)| Head::stored(seq, &hash))
        .transpose()?
        .unwrap_or(Head::EMPTY);
    let link = chain::append(head, record);
    tx.prepare_cached(
        "INSERT INTO audit_events \
         (account_id, account_seq, key_id, action, actor, actor_ip, at, changes, prev_hash, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .map_err(map_err)?
    .execute(params![
        record.account.as_str(),
        link.seq,
        record.key_id.map(KeyId::as_str),
        record.action.as_str(),
        record.actor.name,
        record.actor.ip,
        to_micros(link.at),
        link.changes.to_string(),
        &link.prev_hash[..],
        &link.hash[..],
    ])
    .map_err(map_err)?;
    write_head(tx, record.account.as_str(), link.head())?;
    for prefix in &record.publish {
        publish_change(tx, prefix, record.at)?;
    }
    Ok(())
}

fn write_head(tx: &Transaction<'_>, account: &str, head: Head) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO audit_heads (account_id, last_seq, last_hash) VALUES (?1, ?2, ?3) \
         ON CONFLICT (account_id) DO UPDATE SET last_seq = excluded.last_seq, \
         last_hash = excluded.last_hash",
    )
    .map_err(map_err)?
    .execute(params![account, head.seq, &head.hash[..]])
    .map_err(map_err)?;
    Ok(())
}

/// Decodes a row of [`AUDIT_CHAIN`]: an event (kind 0) or a head (kind 1).
fn chain_row_from_row(row: &Row<'_>) -> Result<AuditChainRow> {
    let kind: i64 = row.get(0).map_err(map_err)?;
    let account_id: String = row.get(1).map_err(map_err)?;
    let seq: Option<i64> = row.get(2).map_err(map_err)?;
    if kind == 1 {
        return Ok(AuditChainRow::Head(StoredAuditHead {
            account_id,
            seq: seq.unwrap_or_default(),
            hash: row.get(11).map_err(map_err)?,
        }));
    }
    // Text that is not JSON (or not text) is an edited row, not an error.
    let changes = row.get::<_, String>(9).ok();
    Ok(AuditChainRow::Event(StoredAuditEvent {
        row_id: row.get(3).map_err(map_err)?,
        account_id,
        seq,
        key_id: row.get(4).map_err(map_err)?,
        action: row.get(5).map_err(map_err)?,
        actor: row.get(6).map_err(map_err)?,
        actor_ip: row.get(7).map_err(map_err)?,
        at: from_micros(row.get(8).map_err(map_err)?)?,
        changes: changes.and_then(|c| serde_json::from_str(&c).ok()),
        prev_hash: row.get(10).map_err(map_err)?,
        hash: row.get(11).map_err(map_err)?,
    }))
}

/// Every event and head, or one account's (`?1`), as
/// [`Store::stream_audit_chain`] hands them out.
const AUDIT_CHAIN: &str = "SELECT 0 AS kind, account_id, account_seq, event_id, key_id, action, \
         actor, actor_ip, at, changes, prev_hash, hash \
     FROM audit_events WHERE ?1 IS NULL OR account_id = ?1 \
     UNION ALL \
     SELECT 1, account_id, last_seq, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, last_hash \
     FROM audit_heads WHERE ?1 IS NULL OR account_id = ?1 \
     ORDER BY account_id, kind, account_seq NULLS FIRST, event_id";

fn publish_change(tx: &Transaction<'_>, prefix: &KeyPrefix, at: OffsetDateTime) -> Result<()> {
    tx.prepare_cached("INSERT INTO key_changes (prefix, at) VALUES (?1, ?2)")
        .map_err(map_err)?
        .execute(params![prefix.as_str(), to_micros(at)])
        .map_err(map_err)?;
    Ok(())
}

/// Decodes a row of [`stream::STREAM_PREFIXES`].
fn prefix_from_row(row: &Row<'_>) -> Result<KeyPrefix> {
    let prefix = row
        .get_ref(0)
        .and_then(|v| Ok(v.as_str()?))
        .map_err(map_err)?;
    rules::field("secret prefix", prefix.parse())
}

/// Decodes a row of [`stream::STREAM_SECRETS`], borrowing its text until parsed.
fn entry_from_row(row: &Row<'_>) -> Result<SecretEntry> {
    let text = |i: usize| -> Result<&str> {
        row.get_ref(i)
            .map_err(map_err)?
            .as_str()
            .map_err(|e| StoreError::internal_from("SQLite column is not text", e))
    };
    let hash = row
        .get_ref(1)
        .map_err(map_err)?
        .as_blob()
        .map_err(|e| StoreError::internal_from("SQLite column is not a blob", e))?;
    // Scopes never hold a character JSON escapes, so they borrow.
    let scopes: Vec<&str> =
        serde_json::from_str(text(8)?).map_err(|e| corrupt("scopes")(e.to_string()))?;
    stream::RawEntry {
        prefix: text(0)?,
        hash,
        superseded: row.get(2).map_err(map_err)?,
        revoked: row.get(3).map_err(map_err)?,
        expires_at: opt_from_micros(row.get(4).map_err(map_err)?)?,
        key_id: text(5)?,
        account_id: text(6)?,
        name: text(7)?,
        scopes: &scopes,
        pepper_id: row.get(9).map_err(map_err)?,
    }
    .parse()
}

/// Reads `s.hash, s.superseded_at, s.pepper_id` and then [`KEY_COLUMNS`],
/// from `offset`.
fn secret_from_row(row: &Row<'_>, offset: usize) -> Result<SecretRecord> {
    let hash: Vec<u8> = row.get(offset).map_err(map_err)?;
    Ok(SecretRecord {
        hash: SecretHash::from_slice(&hash)
            .ok_or_else(|| corrupt("hash")("not 32 bytes".into()))?,
        superseded_at: opt_from_micros(row.get(offset + 1).map_err(map_err)?)?,
        pepper_id: stream::pepper_id(row.get(offset + 2).map_err(map_err)?)?,
        key: key_from_row(row, offset + 3)?,
    })
}

/// The migration ledger on the writer's transaction.
struct Ledger<'a>(&'a Transaction<'a>);

impl migrate::Ledger for Ledger<'_> {
    async fn prepare(&mut self) -> Result<()> {
        self.0.execute(CREATE_LEDGER, []).map_err(map_err)?;
        // SQLite has no ADD COLUMN IF NOT EXISTS.
        let has_checksum: bool = self
            .0
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info('schema_migrations') \
                 WHERE name = 'checksum')",
                [],
                |r| r.get(0),
            )
            .map_err(map_err)?;
        if !has_checksum {
            self.0
                .execute("ALTER TABLE schema_migrations ADD COLUMN checksum TEXT", [])
                .map_err(map_err)?;
        }
        Ok(())
    }

    async fn applied(&mut self) -> Result<Vec<Applied>> {
        let mut stmt = self
            .0
            .prepare("SELECT version, checksum FROM schema_migrations ORDER BY version")
            .map_err(map_err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Applied {
                    version: r.get(0)?,
                    checksum: r.get(1)?,
                })
            })
            .map_err(map_err)?;
        rows.map(|r| r.map_err(map_err)).collect()
    }

    async fn record_checksum(&mut self, version: i64, checksum: &str) -> Result<()> {
        self.0
            .execute(
                "UPDATE schema_migrations SET checksum = ?1 WHERE version = ?2",
                params![checksum, version],
            )
            .map_err(map_err)?;
        Ok(())
    }

    /// A thousand rows at a time in `event_id` order, each account's
    /// running head in memory (one per account, not one per event).
    async fn chain_audit_events(&mut self) -> Result<u64> {
        let tx = self.0;
        let mut heads: BTreeMap<String, Head> = BTreeMap::new();
        let (mut after, mut chained) = (0_i64, 0_u64);
        loop {
            let rows: Vec<StoredAuditEvent> = {
                let mut stmt = tx
                    .prepare(
                        "SELECT event_id, account_id, key_id, action, actor, actor_ip, at, changes \
                         FROM audit_events WHERE event_id > ?1 AND hash IS NULL \
                         ORDER BY event_id LIMIT 1000",
                    )
                    .map_err(map_err)?;
                let mut rows = stmt.query([after]).map_err(map_err)?;
                let mut out = Vec::new();
                while let Some(row) = rows.next().map_err(map_err)? {
                    let changes: String = row.get(7).map_err(map_err)?;
                    out.push(StoredAuditEvent {
                        row_id: row.get(0).map_err(map_err)?,
                        account_id: row.get(1).map_err(map_err)?,
                        seq: None,
                        key_id: row.get(2).map_err(map_err)?,
                        action: row.get(3).map_err(map_err)?,
                        actor: row.get(4).map_err(map_err)?,
                        actor_ip: row.get(5).map_err(map_err)?,
                        at: from_micros(row.get(6).map_err(map_err)?)?,
                        changes: Some(
                            serde_json::from_str(&changes)
                                .map_err(|e| corrupt("audit changes")(e.to_string()))?,
                        ),
                        prev_hash: None,
                        hash: None,
                    });
                }
                out
            };
            let Some(last) = rows.last() else { break };
            after = last.row_id;
            let mut update = tx
                .prepare_cached(
                    "UPDATE audit_events SET account_seq = ?1, prev_hash = ?2, hash = ?3 \
                     WHERE event_id = ?4",
                )
                .map_err(map_err)?;
            for event in &rows {
                let head = heads.entry(event.account_id.clone()).or_insert(Head::EMPTY);
                let changes = event.changes.as_ref().expect("parsed above");
                let next = chain::chain_stored(*head, event, changes);
                update
                    .execute(params![
                        next.seq,
                        &head.hash[..],
                        &next.hash[..],
                        event.row_id
                    ])
                    .map_err(map_err)?;
                *head = next;
                chained += 1;
            }
        }
        for (account, head) in &heads {
            write_head(tx, account, *head)?;
        }
        Ok(chained)
    }

    async fn apply(&mut self, m: &Migration, checksum: &str, at: &str) -> Result<()> {
        self.0
            .execute_batch(m.sql)
            .map_err(|e| migrate::failed(m, e))?;
        self.0
            .execute(
                "INSERT INTO schema_migrations (version, name, applied_at, checksum) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![m.version, m.name, at, checksum],
            )
            .map_err(map_err)?;
        Ok(())
    }
}

#[async_trait]
impl KeySource for SqliteStore {
    async fn find_secret(&self, prefix: &KeyPrefix) -> Result<Option<SecretRecord>> {
        let prefix = prefix.clone();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT s.hash, s.superseded_at, s.pepper_id, {KEY_COLUMNS} FROM key_secrets s \
                 JOIN keys k ON k.key_id = s.key_id WHERE s.prefix = ?1"
            ))
            .map_err(map_err)?
            .query_row([prefix.as_str()], |row| Ok(secret_from_row(row, 0)))
            .optional()
            .map_err(map_err)?
            .transpose()
        })
        .await
    }

    async fn record_usage(&self, usage: &[UsageRecord]) -> Result<()> {
        if usage.is_empty() {
            return Ok(());
        }
        let usage = usage.to_vec();
        self.write(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE keys SET last_used_at = ?1, last_used_ip = ?2 \
                     WHERE key_id = ?3 AND (last_used_at IS NULL OR last_used_at < ?1)",
                )
                .map_err(map_err)?;
            for u in &usage {
                stmt.execute(params![to_micros(u.at), u.ip, u.key_id.as_str()])
                    .map_err(map_err)?;
            }
            Ok(())
        })
        .await
    }

    /// One prepared `UPDATE` per secret, in one `BEGIN IMMEDIATE`
    /// transaction; `IS` compares the pepper id NULL-safely.
    async fn rehash_secrets(&self, rehashes: &[Rehash]) -> Result<Vec<KeyPrefix>> {
        if rehashes.is_empty() {
            return Ok(Vec::new());
        }
        let rehashes = rehashes.to_vec();
        self.write(move |tx| {
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

    async fn change_sequence(&self) -> Result<i64> {
        self.read(|conn| {
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM key_changes", [], |r| {
                r.get(0)
            })
            .map_err(map_err)
        })
        .await
    }

    async fn changes_since(&self, seq: i64, limit: u32) -> Result<Vec<(i64, KeyPrefix)>> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, prefix FROM key_changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .map_err(map_err)?;
            let rows = stmt
                .query_map(params![seq, i64::from(limit)], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(map_err)?;
            let changes = rows
                .map(|r| {
                    let (seq, prefix) = r.map_err(map_err)?;
                    Ok((seq, rules::field("change prefix", prefix.parse())?))
                })
                .collect::<Result<Vec<_>>>()?;
            // Read after the changes: a prune in between can only make this
            // refuse changes it read whole, never pass a gap.
            let pruned_through: i64 = conn
                .prepare_cached("SELECT pruned_through FROM change_log_floor")
                .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
                .map_err(map_err)?;
            rules::check_not_pruned(seq, pruned_through)?;
            Ok(changes)
        })
        .await
    }

    /// Always `None`. SQLite has no way to tell one connection, let alone
    /// another process, that a transaction committed, and an in-process
    /// broadcast would miss writes from other processes on the same file
    /// (e.g. `vilvik-keys bootstrap` while the server runs). The change
    /// log is the one complete source: followers poll
    /// [`KeySource::changes_since`], an indexed read of the `key_changes`
    /// primary key that costs nothing when nothing changed.
    async fn listen(&self) -> Result<Option<Box<dyn crate::ChangeListener>>> {
        Ok(None)
    }

    async fn stream_secrets(
        &self,
        batch: usize,
        sink: &mut (dyn FnMut(Vec<SecretEntry>) + Send),
    ) -> Result<usize> {
        self.stream_rows(
            stream::STREAM_SECRETS,
            Vec::new(),
            batch,
            entry_from_row,
            sink,
        )
        .await
    }

    async fn stream_prefixes(
        &self,
        batch: usize,
        sink: &mut (dyn FnMut(Vec<KeyPrefix>) + Send),
    ) -> Result<usize> {
        self.stream_rows(
            stream::STREAM_PREFIXES,
            Vec::new(),
            batch,
            prefix_from_row,
            sink,
        )
        .await
    }
}

impl SqliteStore {
    /// One statement on the reader connection inside a read transaction,
    /// run on a blocking thread that sends batches to the caller as it
    /// goes. Other reads of this store wait until the stream ends (the
    /// reader connection is busy); writes do not (WAL).
    async fn stream_rows<T: Send + 'static>(
        &self,
        query: &'static str,
        params: Vec<rusqlite::types::Value>,
        batch: usize,
        decode: fn(&Row<'_>) -> Result<T>,
        sink: &mut (dyn FnMut(Vec<T>) + Send),
    ) -> Result<usize> {
        let (tx, rx) = mpsc::channel(stream::BUFFERED_BATCHES);
        let conn = self.reader.clone();
        let producer = tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            // Deferred: a read transaction, one snapshot for every row.
            let read = conn
                .transaction_with_behavior(TransactionBehavior::Deferred)
                .map_err(map_err)?;
            {
                let mut stmt = read.prepare_cached(query).map_err(map_err)?;
                let mut rows = stmt
                    .query(rusqlite::params_from_iter(params))
                    .map_err(map_err)?;
                let mut batches = stream::Batcher::new(batch);
                while let Some(row) = rows.next().map_err(map_err)? {
                    if let Some(full) = batches.push(decode(row)?)
                        && tx.blocking_send(full).is_err()
                    {
                        return Ok(()); // the caller gave up
                    }
                }
                if let Some(rest) = batches.rest()
                    && tx.blocking_send(rest).is_err()
                {
                    return Ok(());
                }
            }
            read.commit().map_err(map_err)
        });
        stream::drain(rx, producer, sink).await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<usize> {
        self.write(|tx| {
            // SQLite's ledger never waits, but the runner is shared with
            // Postgres and async; this is a blocking thread, so block.
            tokio::runtime::Handle::current().block_on(migrate::run(&mut Ledger(tx), SQLITE))
        })
        .await
    }

    async fn create_key_with(
        &self,
        new: NewKey,
        request: Option<&RequestRecord>,
        actor: &Actor,
        policy: &Policy,
    ) -> Result<Outcome<KeyRecord>> {
        let (request, actor, policy) = (request.cloned(), actor.clone(), policy.clone());
        self.write(move |tx| {
            if let Some(request) = &request
                && let Some(replay) = claim_request(tx, &new.account_id, request, new.created_at)?
            {
                return Ok(Outcome::Replayed(Box::new(replay)));
            }
            let account = ensure_account(tx, &new.account_id, new.created_at)?;
            let grantable = account.grantable.as_ref().unwrap_or(&policy.grantable);
            rules::check_grants(None, &new.scopes, grantable, &actor)?;
            let stored: u32 = tx
                .query_row(
                    "SELECT COUNT(*) FROM keys WHERE account_id = ?1",
                    [new.account_id.as_str()],
                    |r| r.get(0),
                )
                .map_err(map_err)?;
            rules::check_stored(account.tier, &policy, stored)?;
            check_room(
                tx,
                &new.account_id,
                account.tier,
                new.created_at,
                policy.tiers,
            )?;
            insert_new_key(tx, &new, &actor)?;
            load_key(tx, &new.account_id, &new.key_id)?
                .map(Outcome::Done)
                .ok_or_else(|| StoreError::internal("created key vanished"))
        })
        .await
    }

    async fn get_key(&self, account: &AccountId, key_id: &KeyId) -> Result<Option<KeyRecord>> {
        let (account, key_id) = (account.clone(), key_id.clone());
        self.read(move |conn| load_key(conn, &account, &key_id))
            .await
    }

    async fn list_keys(
        &self,
        account: &AccountId,
        include_revoked: bool,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<KeyRecord>> {
        let account = account.clone();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT k.seq, {KEY_COLUMNS} FROM keys k WHERE k.account_id = ?1 AND k.seq > ?2 \
                     AND (?3 OR k.revoked_at IS NULL) ORDER BY k.seq LIMIT ?4"
                ))
                .map_err(map_err)?;
            let rows = stmt
                .query_map(
                    params![account.as_str(), after.unwrap_or(0), include_revoked, i64::from(limit) + 1],
                    |row| Ok(row.get::<_, i64>(0).map(|seq| (seq, key_from_row(row, 1)))),
                )
                .map_err(map_err)?;
            let mut items = Vec::new();
            for row in rows {
                let (seq, key) = row.map_err(map_err)?.map_err(map_err)?;
                items.push((seq, key?));
            }
            Ok(page(items, limit))
        })
        .await
    }

    async fn update_key(
        &self,
        account: &AccountId,
        key_id: &KeyId,
        changes: KeyChanges,
        actor: &Actor,
        now: OffsetDateTime,
        policy: &Policy,
    ) -> Result<KeyRecord> {
        let (account, key_id, actor, policy) = (
            account.clone(),
            key_id.clone(),
            actor.clone(),
            policy.clone(),
        );
        self.write(move |tx| {
            let before = load_key_for_change(tx, &account, &key_id, changes.if_version)?;
            let Some(update) = rules::plan_update(&before, changes, now) else {
                return Ok(before);
            };
            if update.needs_account() {
                let stored = ensure_account(tx, &account, now)?;
                let grantable = stored.grantable.as_ref().unwrap_or(&policy.grantable);
                rules::check_grants(
                    Some(&before.scopes),
                    &update.after.scopes,
                    grantable,
                    &actor,
                )?;
                if update.weakens_manager {
                    keep_a_manager(tx, &before, now)?;
                }
                if update.needs_room {
                    check_room(tx, &account, stored.tier, now, policy.tiers)?;
                }
            }
            let rules::Update { after, diff, .. } = update;
            tx.execute(
                "UPDATE keys SET name = ?1, description = ?2, scopes = ?3, expires_at = ?4, \
                 version = ?5 WHERE key_id = ?6",
                params![
                    after.name.as_str(),
                    after.description.as_str(),
                    scopes_json(&after.scopes),
                    after.expires_at.map(to_micros),
                    after.version,
                    key_id.as_str()
                ],
            )
            .map_err(map_err)?;
            record_change(tx, &ChangeRecord::updated(&after, diff, &actor, now))?;
            Ok(after)
        })
        .await
    }

    async fn rotate_key_with(
        &self,
        account: &AccountId,
        key_id: &KeyId,
        rotation: &RotationRequest,
        actor: &Actor,
        now: OffsetDateTime,
        policy: &Policy,
    ) -> Result<Outcome<Rotation>> {
        let (account, key_id, rotation, actor) = (
            account.clone(),
            key_id.clone(),
            rotation.clone(),
            actor.clone(),
        );
        let kept = policy.rotated_secrets_kept;
        self.write(move |tx| {
            if let Some(request) = &rotation.request
                && let Some(replay) = claim_request(tx, &account, request, now)?
            {
                    return Ok(Outcome::Replayed(Box::new(replay)));
            }
            let secret = &rotation.secret;
            let before = load_key_for_change(tx, &account, &key_id, rotation.if_version)?;
            rules::ensure_rotatable(&before, now)?;
            tx.execute(
                "UPDATE key_secrets SET superseded_at = ?1 WHERE prefix = ?2",
                params![to_micros(now), before.prefix.as_str()],
            )
            .map_err(map_err)?;
            insert_secret(tx, secret, &key_id, now)?;
            let pruned = deleted_prefixes(
                &mut tx.prepare_cached(PRUNE_KEY_SECRETS).map_err(map_err)?,
                params![key_id.as_str(), kept],
            )?;
            tx.execute(
                "UPDATE keys SET prefix = ?1, rotated_at = ?2, version = version + 1 WHERE key_id = ?3",
                params![secret.prefix.as_str(), to_micros(now), key_id.as_str()],
            )
            .map_err(map_err)?;
            // The pruned secrets are published too: a node that cached one
            // must forget it, or it answers from memory for good.
            let mut record = ChangeRecord::rotated(&before, &secret.prefix, &actor, now);
            record.publish.extend(&pruned);
            record_change(tx, &record)?;
            let key = load_key(tx, &account, &key_id)?
                .ok_or_else(|| StoreError::internal("rotated key vanished"))?;
            Ok(Outcome::Done(Rotation {
                key,
                replaced_prefix: before.prefix,
                pruned_prefixes: pruned,
            }))
        })
        .await
    }

    async fn revoke_key_if(
        &self,
        account: &AccountId,
        key_id: &KeyId,
        reason: &str,
        if_version: Option<i64>,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<KeyRecord> {
        let (account, key_id, reason, actor) = (
            account.clone(),
            key_id.clone(),
            reason.to_owned(),
            actor.clone(),
        );
        self.write(move |tx| {
            let before = load_key_for_change(tx, &account, &key_id, if_version)?;
            if rules::is_active_manager(&before, now) {
                keep_a_manager(tx, &before, now)?;
            }
            tx.execute(
                "UPDATE keys SET revoked_at = ?1, revoke_reason = ?2, version = version + 1 \
                 WHERE key_id = ?3",
                params![to_micros(now), reason, key_id.as_str()],
            )
            .map_err(map_err)?;
            record_change(tx, &ChangeRecord::revoked(&before, &reason, &actor, now))?;
            load_key(tx, &account, &key_id)?
                .ok_or_else(|| StoreError::internal("revoked key vanished"))
        })
        .await
    }

    async fn list_audit_events(
        &self,
        account: &AccountId,
        key_id: Option<&KeyId>,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<AuditEvent>> {
        let (account, key_id) = (account.clone(), key_id.cloned());
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT account_seq, account_id, key_id, action, actor, actor_ip, at, changes FROM audit_events \
                     WHERE account_id = ?1 AND (?2 IS NULL OR key_id = ?2) AND account_seq > ?3 \
                     ORDER BY account_seq LIMIT ?4",
                )
                .map_err(map_err)?;
            let mut rows = stmt
                .query(params![
                    account.as_str(),
                    key_id.as_ref().map(KeyId::as_str),
                    after.unwrap_or(0),
                    i64::from(limit) + 1
                ])
                .map_err(map_err)?;
            let mut items = Vec::new();
            while let Some(row) = rows.next().map_err(map_err)? {
                let event_id: i64 = row.get(0).map_err(map_err)?;
                let key_id: Option<String> = row.get(2).map_err(map_err)?;
                let action: String = row.get(3).map_err(map_err)?;
                let changes: String = row.get(7).map_err(map_err)?;
                let event = AuditEvent {
                    event_id,
                    account_id: account.clone(),
                    key_id: rules::field("audit key id", key_id.map(|k| k.parse::<KeyId>()).transpose())?,
                    action: action.parse().map_err(corrupt("audit action"))?,
                    actor: row.get(4).map_err(map_err)?,
                    actor_ip: row.get(5).map_err(map_err)?,
                    at: from_micros(row.get(6).map_err(map_err)?)?,
                    changes: serde_json::from_str(&changes).map_err(|e| corrupt("audit changes")(e.to_string()))?,
                };
                items.push((event_id, event));
            }
            Ok(page(items, limit))
        })
        .await
    }

    async fn get_account(&self, account: &AccountId) -> Result<Account> {
        let account = account.clone();
        self.read(move |conn| load_account(conn, &account)).await
    }

    async fn set_tier(
        &self,
        account: &AccountId,
        tier: Tier,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Account> {
        let (account, actor) = (account.clone(), actor.clone());
        self.write(move |tx| {
            let mut stored = ensure_account(tx, &account, now)?;
            if stored.tier != tier {
                tx.execute(
                    "UPDATE accounts SET tier = ?1 WHERE account_id = ?2",
                    params![tier.as_str(), account.as_str()],
                )
                .map_err(map_err)?;
                record_change(
                    tx,
                    &ChangeRecord::tier_changed(&account, stored.tier, tier, &actor, now),
                )?;
                stored.tier = tier;
            }
            Ok(stored)
        })
        .await
    }

    async fn set_grantable_scopes(
        &self,
        account: &AccountId,
        grantable: Option<&ScopeCatalogue>,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Account> {
        let (account, grantable, actor) = (account.clone(), grantable.cloned(), actor.clone());
        self.write(move |tx| {
            let mut stored = ensure_account(tx, &account, now)?;
            if stored.grantable != grantable {
                let json = grantable
                    .as_ref()
                    .map(|c| serde_json::to_string(&c.to_strings()).expect("strings serialize"));
                tx.execute(
                    "UPDATE accounts SET grantable_scopes = ?1 WHERE account_id = ?2",
                    params![json, account.as_str()],
                )
                .map_err(map_err)?;
                record_change(
                    tx,
                    &ChangeRecord::grantable_changed(
                        &account,
                        stored.grantable.as_ref(),
                        grantable.as_ref(),
                        &actor,
                        now,
                    ),
                )?;
                stored.grantable = grantable;
            }
            Ok(stored)
        })
        .await
    }

    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64> {
        self.write(move |tx| {
            let through: Option<i64> = tx
                .query_row(
                    "SELECT MAX(seq) FROM key_changes \
                     WHERE at < ?1 AND seq < (SELECT MAX(seq) FROM key_changes)",
                    params![to_micros(before)],
                    |r| r.get(0),
                )
                .map_err(map_err)?;
            let floor: i64 = tx
                .query_row("SELECT pruned_through FROM change_log_floor", [], |r| {
                    r.get(0)
                })
                .map_err(map_err)?;
            let Some(Prune { through, floor }) = rules::plan_prune(through, floor) else {
                return Ok(0);
            };
            let pruned = tx
                .execute("DELETE FROM key_changes WHERE seq <= ?1", params![through])
                .map_err(map_err)?;
            tx.execute(
                "UPDATE change_log_floor SET pruned_through = ?1",
                params![floor],
            )
            .map_err(map_err)?;
            Ok(pruned as u64)
        })
        .await
    }

    async fn prune_requests(&self, now: OffsetDateTime) -> Result<u64> {
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM requests WHERE expires_at <= ?1",
                params![to_micros(now)],
            )
            .map(|n| n as u64)
            .map_err(map_err)
        })
        .await
    }

    async fn prune_rotated_secrets(&self, before: OffsetDateTime) -> Result<u64> {
        self.write(move |tx| {
            let pruned = deleted_prefixes(
                &mut tx
                    .prepare_cached(
                        "DELETE FROM key_secrets WHERE superseded_at IS NOT NULL \
                         AND superseded_at < ?1 RETURNING prefix",
                    )
                    .map_err(map_err)?,
                params![to_micros(before)],
            )?;
            // Published, so that nodes caching them forget them.
            let now = OffsetDateTime::now_utc();
            for prefix in &pruned {
                publish_change(tx, prefix, now)?;
            }
            Ok(pruned.len() as u64)
        })
        .await
    }

    /// One `BEGIN IMMEDIATE` transaction and the same cached statements as
    /// `create_key`, minus the cap check.
    async fn import_keys(&self, keys: Vec<NewKey>, actor: &Actor) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let actor = actor.clone();
        self.write(move |tx| {
            // Each account once, created as of its earliest imported key.
            let mut accounts: BTreeMap<&str, OffsetDateTime> = BTreeMap::new();
            for key in &keys {
                accounts
                    .entry(key.account_id.as_str())
                    .and_modify(|at| *at = (*at).min(key.created_at))
                    .or_insert(key.created_at);
            }
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO accounts (account_id, tier, created_at) VALUES (?1, 'free', ?2) \
                         ON CONFLICT DO NOTHING",
                    )
                    .map_err(map_err)?;
                for (account, at) in accounts {
                    stmt.execute(params![account, to_micros(at)])
                        .map_err(map_err)?;
                }
            }
            for key in &keys {
                insert_new_key(tx, key, &actor)?;
            }
            Ok(())
        })
        .await
    }

    async fn stream_audit_chain(
        &self,
        account: Option<&AccountId>,
        batch: usize,
        sink: &mut (dyn FnMut(Vec<AuditChainRow>) + Send),
    ) -> Result<usize> {
        let account = match account {
            Some(a) => rusqlite::types::Value::Text(a.as_str().to_owned()),
            None => rusqlite::types::Value::Null,
        };
        self.stream_rows(AUDIT_CHAIN, vec![account], batch, chain_row_from_row, sink)
            .await
    }

    async fn secrets_by_pepper(&self) -> Result<Vec<PepperUse>> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(stream::SECRETS_BY_PEPPER)
                .map_err(map_err)?;
            let mut rows = stmt.query([]).map_err(map_err)?;
            let mut uses = Vec::new();
            while let Some(row) = rows.next().map_err(map_err)? {
                uses.push(PepperUse {
                    pepper_id: stream::pepper_id(row.get(0).map_err(map_err)?)?,
                    live: row.get::<_, i64>(1).map_err(map_err)? as u64,
                    total: row.get::<_, i64>(2).map_err(map_err)? as u64,
                });
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
    /// of the store's must sync every commit (issue 11, point 4).
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

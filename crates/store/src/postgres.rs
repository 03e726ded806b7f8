//! The production backend: PostgreSQL through a deadpool connection pool.
//!
//! Several replicas share one database, so every rule that SQLite gets from
//! its single writer is taken explicitly here:
//!
//! - a change locks the key's row (`FOR UPDATE`) before reading it, so two
//!   admins changing one key serialize;
//! - the cap on active keys is checked with the account's row locked, and
//!   every operation that can make a key active (create, extending an
//!   expired key) takes that lock first, so concurrent creates cannot
//!   overshoot;
//! - appending to the change log takes a transaction-scoped advisory lock,
//!   so change sequence numbers become visible in the order they were
//!   assigned and a follower reading `changes_since` never skips a change
//!   that commits late;
//! - migrations run under an advisory lock, so replicas starting together
//!   apply each migration once.
//!
//! Every change also sends `NOTIFY` on [`CHANGE_CHANNEL`] with the payload
//! `<seq>:<prefix>` (its change sequence number and the changed prefix);
//! Postgres delivers it when the transaction commits, so listeners see
//! changes in sequence order. [`KeySource::listen`] subscribes on a connection
//! of its own, outside the pool.
//!
//! Both the pool and the listener connect with one rustls connector built
//! from the URL's `sslmode` and `sslrootcert` (`tls.rs`; the modes are
//! listed on [`PostgresStore::connect`]).

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    Transaction,
};
use futures_util::TryStreamExt;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql};
use vilvik_keys_domain::{
    AccountId, AuditAction, KeyId, KeyPrefix, PepperId, ScopeCatalogue, SecretHash, Tier,
    TierLimits,
};

use crate::chain::{self, GENESIS, Head};
use crate::migrate::{self, Applied, CREATE_LEDGER, Migration, POSTGRES};
use crate::rules::{self, ChangeRecord, Prune, RawKey, corrupt, page};
use crate::stream;
use crate::{
    Account, Actor, AuditChainRow, AuditEvent, ChangeListener, FieldChange, KeyChanges, KeyRecord,
    KeySource, NewKey, Outage, OutageKind, Outcome, Page, PepperUse, Policy, Rehash, Replay,
    RequestRecord, Result, Rotation, RotationRequest, SecretEntry, SecretRecord, Store, StoreError,
    StoredAuditEvent, StoredAuditHead, UsageRecord,
};

/// The `LISTEN`/`NOTIFY` channel on which every change publishes
/// `<seq>:<prefix>`: its change sequence number and the affected key
/// prefix. Verify nodes listen on it to evict cached entries.
pub const CHANGE_CHANNEL: &str = "vilvik_keys_changes";

mod listen;
mod tls;

pub use listen::ListenerOptions;

/// How a [`PostgresStore`] bounds its calls and watches its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresOptions {
    /// The server cancels any statement running longer (`statement_timeout`
    /// on every pooled connection), so a lock wait or a runaway query
    /// fails instead of holding a connection. Streams, migrations, imports
    /// and pruning, which may rightly run longer, lift it for their own
    /// transaction.
    pub statement_timeout: Duration,
    pub listener: ListenerOptions,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            statement_timeout: Duration::from_secs(5),
            listener: ListenerOptions::default(),
        }
    }
}

/// Connections per replica.
const POOL_SIZE: usize = 16;
/// How long a call waits for a free connection, a new connection or a
/// connection check before it fails as [`StoreError::Unavailable`].
const POOL_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP connect timeout when the URL does not set one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive on pooled connections (unless the URL sets its own), and
/// how long sent data may stay unacknowledged before the kernel gives up
/// on the connection: a peer that vanished, or a partition that drops
/// packets, ends a pooled connection within about ten seconds instead of
/// the kernel's default of many minutes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifts the statement timeout for the transaction it runs in.
/// Deletes a key's rotated-away secrets but the newest `$2`.
const PRUNE_KEY_SECRETS: &str = "DELETE FROM key_secrets WHERE key_id = $1 AND superseded_at IS NOT NULL \
     AND prefix NOT IN (SELECT prefix FROM key_secrets WHERE key_id = $1 AND superseded_at IS NOT NULL \
     ORDER BY superseded_at DESC, seq DESC LIMIT $2) RETURNING prefix";
const NO_STATEMENT_TIMEOUT: &str = "SET LOCAL statement_timeout = 0";

/// Advisory lock ids (arbitrary constants, unique to this service).
/// NEVER CHANGE THESE while replicas of an older version may be running.
const MIGRATION_LOCK: i64 = 0x766b_6d69_6772_0001; // "vkmigr" 1
const CHANGE_LOG_LOCK: i64 = 0x766b_6368_6e67_0001; // "vkchng" 1

const SELECT_KEY: &str = concat!(
    "SELECT ",
    key_columns!(),
    " FROM keys k WHERE k.account_id = $1 AND k.key_id = $2"
);
const SELECT_KEY_FOR_UPDATE: &str = concat!(
    "SELECT ",
    key_columns!(),
    " FROM keys k WHERE k.account_id = $1 AND k.key_id = $2 FOR UPDATE"
);
const LIST_KEYS: &str = concat!(
    "SELECT k.seq, ",
    key_columns!(),
    " FROM keys k WHERE k.account_id = $1 AND k.seq > $2 \
     AND ($3::boolean OR k.revoked_at IS NULL) ORDER BY k.seq LIMIT $4"
);
const FIND_SECRET: &str = concat!(
    "SELECT s.hash, s.superseded_at, s.pepper_id, ",
    key_columns!(),
    " FROM key_secrets s JOIN keys k ON k.key_id = s.key_id WHERE s.prefix = $1"
);

// Bulk import: one statement per table per call, the rows passed as
// arrays and unnested. `WITH ORDINALITY ... ORDER BY ord` keeps the input
// order, so `keys.seq`, event ids and change sequence numbers follow it.
const IMPORT_ACCOUNTS: &str = "INSERT INTO accounts (account_id, tier, created_at) \
     SELECT account_id, 'free', MIN(created_at) \
     FROM UNNEST($1::text[], $2::timestamptz[]) AS n (account_id, created_at) \
     GROUP BY account_id ORDER BY account_id \
     ON CONFLICT DO NOTHING";
/// Scopes travel space-separated (a scope never holds a space):
/// Postgres arrays cannot nest arrays of different lengths.
const IMPORT_KEYS: &str = "INSERT INTO keys \
         (key_id, account_id, name, description, scopes, prefix, created_at, expires_at) \
     SELECT key_id, account_id, name, description, string_to_array(scopes, ' '), prefix, \
         created_at, expires_at \
     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::timestamptz[], $8::timestamptz[]) WITH ORDINALITY \
         AS n (key_id, account_id, name, description, scopes, prefix, created_at, expires_at, ord) \
     ORDER BY ord";
const IMPORT_SECRETS: &str = "INSERT INTO key_secrets (prefix, key_id, hash, pepper_id, created_at) \
     SELECT prefix, key_id, hash, pepper_id, created_at \
     FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::timestamptz[]) \
         WITH ORDINALITY AS n (prefix, key_id, hash, pepper_id, created_at, ord) \
     ORDER BY ord";
const INSERT_SECRET: &str = "INSERT INTO key_secrets (prefix, key_id, hash, pepper_id, created_at) \
     VALUES ($1, $2, $3, $4, $5)";
const IMPORT_AUDIT: &str = "INSERT INTO audit_events \
         (account_id, account_seq, key_id, action, actor, actor_ip, at, changes, prev_hash, hash) \
     SELECT account_id, account_seq, key_id, $1, $2, $3, at, changes, prev_hash, hash \
     FROM UNNEST($4::text[], $5::bigint[], $6::text[], $7::timestamptz[], $8::jsonb[], \
         $9::bytea[], $10::bytea[]) WITH ORDINALITY \
         AS n (account_id, account_seq, key_id, at, changes, prev_hash, hash, ord) \
     ORDER BY ord";
/// Creates the heads of accounts new to the audit log and locks every one
/// (in account order, so that two imports cannot deadlock), returning each.
const IMPORT_LOCK_HEADS: &str = "INSERT INTO audit_heads (account_id, last_seq, last_hash) \
     SELECT account_id, 0, $2 FROM UNNEST($1::text[]) AS n (account_id) ORDER BY account_id \
     ON CONFLICT (account_id) DO UPDATE SET account_id = excluded.account_id \
     RETURNING account_id, last_seq, last_hash";
const IMPORT_HEADS: &str = "UPDATE audit_heads h SET last_seq = n.seq, last_hash = n.hash \
     FROM UNNEST($1::text[], $2::bigint[], $3::bytea[]) AS n (account_id, seq, hash) \
     WHERE h.account_id = n.account_id";

/// Creates the account's head if it has none and locks it until the
/// transaction ends (`DO UPDATE` locks the row, as `FOR UPDATE` would, in
/// one round trip), returning it: an account's events are chained one
/// after the other, so concurrent changes can neither fork its chain nor
/// reuse a number (and `UNIQUE (account_id, account_seq)` would refuse it).
const LOCK_HEAD: &str = "INSERT INTO audit_heads (account_id, last_seq, last_hash) \
     VALUES ($1, 0, $2) \
     ON CONFLICT (account_id) DO UPDATE SET account_id = excluded.account_id \
     RETURNING last_seq, last_hash";
/// Writes the event and moves the head to it.
const INSERT_EVENT: &str = "WITH event AS ( \
         INSERT INTO audit_events \
             (account_id, account_seq, key_id, action, actor, actor_ip, at, changes, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ) \
     UPDATE audit_heads SET last_seq = $2, last_hash = $10 WHERE account_id = $1";

/// Every event and head, or one account's (`$1`), as
/// [`Store::stream_audit_chain`] hands them out.
const AUDIT_CHAIN: &str = "SELECT 0 AS kind, account_id, account_seq, event_id, key_id, action, \
         actor, actor_ip, at, changes, prev_hash, hash \
     FROM audit_events WHERE $1::text IS NULL OR account_id = $1::text \
     UNION ALL \
     SELECT 1, account_id, last_seq, NULL::bigint, NULL::text, NULL::text, NULL::text, \
         NULL::text, NULL::timestamptz, NULL::jsonb, NULL::bytea, last_hash \
     FROM audit_heads WHERE $1::text IS NULL OR account_id = $1::text \
     ORDER BY account_id, kind, account_seq NULLS FIRST, event_id";
const IMPORT_CHANGES: &str = "INSERT INTO key_changes (prefix, at) \
     SELECT prefix, at FROM UNNEST($1::text[], $2::timestamptz[]) WITH ORDINALITY \
         AS n (prefix, at, ord) \
     ORDER BY ord";

/// One statement for a whole batch of usage. Duplicates of a key keep the
/// latest use; rows are locked in key order so two nodes flushing
/// overlapping batches cannot deadlock; an older time never overwrites a
/// newer one.
const RECORD_USAGE: &str = "WITH usage AS ( \
         SELECT DISTINCT ON (key_id) key_id, at, ip \
         FROM UNNEST($1::text[], $2::timestamptz[], $3::text[]) AS u (key_id, at, ip) \
         ORDER BY key_id, at DESC \
     ), locked AS ( \
         SELECT k.key_id FROM keys k JOIN usage USING (key_id) ORDER BY k.key_id FOR UPDATE OF k \
     ) \
     UPDATE keys k SET last_used_at = usage.at, last_used_ip = usage.ip \
     FROM usage JOIN locked USING (key_id) \
     WHERE k.key_id = usage.key_id AND (k.last_used_at IS NULL OR k.last_used_at < usage.at)";

/// One statement for a batch of re-hashes, each applied only if the stored
/// hash and pepper id are still the old ones (`IS NOT DISTINCT FROM`: NULL
/// is a legacy hash). Rows are locked in prefix order, as usage locks keys,
/// so two nodes re-hashing overlapping batches cannot deadlock; a row
/// changed meanwhile is re-checked against the condition once its lock is
/// had (READ COMMITTED), so a concurrent re-hash is never overwritten.
const REHASH_SECRETS: &str = "WITH r AS ( \
         SELECT DISTINCT ON (prefix) prefix, old_hash, old_pepper, new_hash, new_pepper \
         FROM UNNEST($1::text[], $2::bytea[], $3::bigint[], $4::bytea[], $5::bigint[]) \
             AS r (prefix, old_hash, old_pepper, new_hash, new_pepper) \
         ORDER BY prefix \
     ), locked AS ( \
         SELECT s.prefix FROM key_secrets s JOIN r USING (prefix) ORDER BY s.prefix FOR UPDATE OF s \
     ) \
     UPDATE key_secrets s SET hash = r.new_hash, pepper_id = r.new_pepper \
     FROM r JOIN locked USING (prefix) \
     WHERE s.prefix = r.prefix AND s.hash = r.old_hash \
         AND s.pepper_id IS NOT DISTINCT FROM r.old_pepper \
     RETURNING s.prefix";

/// The Postgres store. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// The pool's connection settings and TLS connector, for the
    /// listener's own connection.
    config: Arc<tokio_postgres::Config>,
    tls: tls::Connector,
    listener: ListenerOptions,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the configuration: it may hold a password.
        f.debug_struct("PostgresStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

/// A connection string that does not parse. Carries no part of the input,
/// which may contain a password.
#[derive(Debug, thiserror::Error)]
#[error(
    "DATABASE_URL is not a valid Postgres connection string ({0}); expected e.g. postgres://user:password@host:5432/dbname"
)]
struct BadUrl(String);

impl PostgresStore {
    /// Builds a pool for the database at `url` (a `postgres://` URL or a
    /// `key=value` connection string) and checks that one connection works,
    /// so a wrong URL or an unreachable server fails at start.
    ///
    /// TLS follows the URL's `sslmode`, as in libpq, for the pool and the
    /// change listener's connection alike (rustls, ring provider):
    ///
    /// - `disable`: plain TCP;
    /// - `prefer` (the default): TLS when the server offers it, else plain;
    /// - `require`: TLS, the certificate not verified;
    /// - `verify-ca`: TLS, the certificate's chain verified against the CA
    ///   certificates in the PEM file `sslrootcert` names;
    /// - `verify-full`: as `verify-ca`, and the certificate must name the
    ///   host of the URL (or its IP address).
    ///
    /// `prefer` and `require` with `sslrootcert` verify the chain too, as
    /// libpq does. `verify-ca` and `verify-full` without `sslrootcert`
    /// (libpq would look for `~/.postgresql/root.crt`), a `sslrootcert`
    /// that cannot be read or holds no certificate, and any other
    /// `sslmode` fail here, naming the parameter. A server certificate
    /// the verifier refuses is [`StoreError::Internal`], a configuration
    /// mistake, not an outage. Client certificates (`sslcert`, `sslkey`)
    /// are not supported.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// [`PostgresStore::connect`] with `options` instead of the defaults.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self> {
        let bad_tls = |e| StoreError::internal_from("cannot use DATABASE_URL", e);
        // tokio-postgres knows neither `sslrootcert` nor the `verify-*`
        // modes: they come out first, and the rest parses as before.
        let (url, tls_settings) = tls::split(url).map_err(bad_tls)?;
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e: tokio_postgres::Error| {
                StoreError::internal_from("cannot use DATABASE_URL", BadUrl(e.to_string()))
            })?;
        config.ssl_mode(tls_settings.mode.negotiation());
        let tls = tls::connector(&tls_settings).map_err(bad_tls)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("vilvik-keys");
        }
        // tokio-postgres's default idle time is two hours: as good as none.
        if config.get_keepalives() && config.get_keepalives_idle() == Duration::from_secs(2 * 3600)
        {
            config
                .keepalives(true)
                .keepalives_idle(KEEPALIVE_IDLE)
                .keepalives_interval(KEEPALIVE_INTERVAL)
                .keepalives_retries(KEEPALIVE_RETRIES);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        let timeout = format!(
            "-c statement_timeout={}",
            options.statement_timeout.as_millis().max(1)
        );
        let server_options = match config.get_options() {
            Some(theirs) => format!("{theirs} {timeout}"),
            None => timeout,
        };
        config.options(server_options);
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| {
                StoreError::internal_from("cannot build the Postgres connection pool", e)
            })?;
        let store = Self {
            pool,
            config: Arc::new(config),
            tls,
            listener: options.listener,
        };
        // A refused login, a missing database or a refused certificate is
        // a configuration mistake, not an outage: say where to look.
        let at_start = |e: StoreError| match e {
            StoreError::Internal(message, source) if message != UNTRUSTED_SERVER => {
                StoreError::Internal(
                    "cannot log in to the database named by DATABASE_URL".to_owned(),
                    source,
                )
            }
            other => other,
        };
        let client = store.client().await.map_err(at_start)?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(map_err)
            .map_err(at_start)?;
        Ok(store)
    }

    /// How listeners of this store (and its clones made after this) watch
    /// their connections; [`ListenerOptions::default`] unless set here.
    pub fn with_listener_options(mut self, options: ListenerOptions) -> Self {
        self.listener = options;
        self
    }

    async fn client(&self) -> Result<Object> {
        self.pool.get().await.map_err(map_pool_err)
    }
}

fn map_pool_err(e: PoolError) -> StoreError {
    use deadpool_postgres::TimeoutType;
    match e {
        // The pool only reaches the server itself to make a connection.
        PoolError::Backend(e) => map_connect_err(e),
        PoolError::Timeout(TimeoutType::Create) => {
            StoreError::unavailable(OutageKind::ConnectionRefused, e)
        }
        PoolError::Timeout(TimeoutType::Wait | TimeoutType::Recycle) | PoolError::Closed => {
            StoreError::unavailable(OutageKind::PoolTimeout, e)
        }
        PoolError::PostCreateHook(_) => StoreError::unavailable(OutageKind::ConnectionRefused, e),
        PoolError::NoRuntimeSpecified => {
            StoreError::internal_from("the Postgres pool is misconfigured", e)
        }
    }
}

/// What a server certificate the verifier refused is reported as.
const UNTRUSTED_SERVER: &str = "the database server's TLS certificate is not trusted: check \
     sslrootcert in DATABASE_URL (the CA that signed the server's certificate) and, with \
     sslmode=verify-full, that the URL's host is a name the certificate holds";

/// A failure to open a new connection. Only a refused login, a missing
/// database or a refused server certificate is a mistake to report as
/// such; the rest is an outage.
fn map_connect_err(e: tokio_postgres::Error) -> StoreError {
    if tls::certificate_refused(&e) {
        return StoreError::internal_from(UNTRUSTED_SERVER, e);
    }
    let Some(code) = e.code() else {
        return StoreError::unavailable(OutageKind::ConnectionRefused, e);
    };
    match &code.code()[..2] {
        // Invalid authorization, unknown database: configuration, not outage.
        "28" | "3D" => StoreError::internal_from("cannot connect to Postgres", e),
        // 55000 is how Postgres refuses a database with ALLOW_CONNECTIONS
        // false; 53300 too many clients; 57P0x shutting down or starting.
        "55" | "53" | "57" => StoreError::unavailable(OutageKind::NotAcceptingConnections, e),
        _ => StoreError::unavailable(OutageKind::ConnectionRefused, e),
    }
}

/// How a failed statement says the database is down or busy, if it does.
/// An error response with a SQLSTATE means the statement (and with it the
/// transaction) failed for sure; only a broken connection leaves open
/// whether a commit went through.
fn outage_of(code: &SqlState) -> Option<OutageKind> {
    if *code == SqlState::QUERY_CANCELED || *code == SqlState::LOCK_NOT_AVAILABLE {
        return Some(OutageKind::StatementTimeout);
    }
    match &code.code()[..2] {
        // Serialization failure, deadlock detected.
        "40" => Some(OutageKind::StatementTimeout),
        // Connection exception.
        "08" => Some(OutageKind::ConnectionLost),
        // Insufficient resources; operator intervention (shutdown,
        // terminated backend).
        "53" | "57" => Some(OutageKind::NotAcceptingConnections),
        _ => None,
    }
}

fn map_err(e: tokio_postgres::Error) -> StoreError {
    // Only a connection being made (the listener's) can fail this way.
    if tls::certificate_refused(&e) {
        return StoreError::internal_from(UNTRUSTED_SERVER, e);
    }
    if let Some(code) = e.code() {
        if *code == SqlState::UNIQUE_VIOLATION {
            return StoreError::Conflict;
        }
        if let Some(kind) = outage_of(code) {
            return StoreError::unavailable(kind, e);
        }
        return StoreError::internal_from("Postgres statement failed", e);
    }
    // No SQLSTATE: either the connection failed or we sent/read something
    // wrong. tokio-postgres exposes the kind only through its message.
    let message = e.to_string();
    let connecting = matches!(
        message.as_str(),
        "error connecting to server" | "timeout waiting for server"
    );
    let connection_level = e.is_closed()
        || e.source().is_some_and(|s| s.is::<std::io::Error>())
        || message == "error communicating with the server";
    if connecting {
        StoreError::unavailable(OutageKind::ConnectionRefused, e)
    } else if connection_level {
        StoreError::unavailable(OutageKind::ConnectionLost, e)
    } else {
        StoreError::internal_from("Postgres call failed", e)
    }
}

async fn execute(c: &impl GenericClient, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
    let stmt = c.prepare_cached(sql).await.map_err(map_err)?;
    c.execute(&stmt, params).await.map_err(map_err)
}

async fn query(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>> {
    let stmt = c.prepare_cached(sql).await.map_err(map_err)?;
    c.query(&stmt, params).await.map_err(map_err)
}

async fn query_one(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Row> {
    let stmt = c.prepare_cached(sql).await.map_err(map_err)?;
    c.query_one(&stmt, params).await.map_err(map_err)
}

async fn query_opt(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>> {
    let stmt = c.prepare_cached(sql).await.map_err(map_err)?;
    c.query_opt(&stmt, params).await.map_err(map_err)
}

/// Reads the columns of `key_columns!()` starting at `offset`.
fn key_from_row(row: &Row, offset: usize) -> Result<KeyRecord> {
    let get = |i: usize| row.try_get(offset + i).map_err(map_err);
    let get_text = |i: usize| row.try_get::<_, String>(offset + i).map_err(map_err);
    RawKey {
        key_id: get_text(0)?,
        account_id: get_text(1)?,
        name: get_text(2)?,
        description: get_text(3)?,
        scopes: row.try_get(offset + 4).map_err(map_err)?,
        prefix: get_text(5)?,
        created_at: row.try_get(offset + 6).map_err(map_err)?,
        expires_at: get(7)?,
        revoked_at: get(8)?,
        revoke_reason: row.try_get(offset + 9).map_err(map_err)?,
        rotated_at: get(10)?,
        last_used_at: get(11)?,
        last_used_ip: row.try_get(offset + 12).map_err(map_err)?,
        version: row.try_get(offset + 13).map_err(map_err)?,
    }
    .parse()
}

/// Postgres counts in `BIGINT`; the cap is a `u32`.
fn count(row: &Row) -> Result<u32> {
    let n: i64 = row.try_get(0).map_err(map_err)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

async fn load_key(
    c: &impl GenericClient,
    account: &AccountId,
    key_id: &KeyId,
) -> Result<Option<KeyRecord>> {
    query_opt(c, SELECT_KEY, &[&account.as_str(), &key_id.as_str()])
        .await?
        .map(|row| key_from_row(&row, 0))
        .transpose()
}

/// The key with its row locked until the transaction ends; refuses a
/// revoked key, and one no longer at `if_version`.
async fn load_key_for_change(
    c: &impl GenericClient,
    account: &AccountId,
    key_id: &KeyId,
    if_version: Option<i64>,
) -> Result<KeyRecord> {
    let row = query_opt(
        c,
        SELECT_KEY_FOR_UPDATE,
        &[&account.as_str(), &key_id.as_str()],
    )
    .await?
    .ok_or(StoreError::NotFound)?;
    let key = key_from_row(&row, 0)?;
    rules::ensure_not_revoked(&key)?;
    rules::check_version(&key, if_version)?;
    Ok(key)
}

/// Records `request` for its retries, unless its id is already recorded
/// (and its window still open): then what the first call did, or a
/// refusal when that call was another. Call it first in the transaction.
/// A concurrent call with the same id waits on the insert until the
/// first one's transaction ends, then finds its record (or, if it rolled
/// back, records its own).
async fn claim_request(
    c: &impl GenericClient,
    account: &AccountId,
    request: &RequestRecord,
    now: OffsetDateTime,
) -> Result<Option<Replay>> {
    let digest = &request.digest[..];
    execute(
        c,
        "DELETE FROM requests WHERE account_id = $1 AND request_digest = $2 AND expires_at <= $3",
        &[&account.as_str(), &digest, &now],
    )
    .await?;
    let claimed = execute(
        c,
        "INSERT INTO requests (account_id, request_digest, method, params_digest, key_id, \
         sealed_secret, pepper_id, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (account_id, request_digest) DO NOTHING",
        &[
            &account.as_str(),
            &digest,
            &request.method.as_str(),
            &&request.params[..],
            &request.key_id.as_str(),
            &request.sealed,
            &request.pepper_id.to_stored(),
            &request.expires_at,
        ],
    )
    .await?;
    if claimed == 1 {
        return Ok(None);
    }
    let row = query_one(
        c,
        "SELECT method, params_digest, key_id, sealed_secret, pepper_id FROM requests \
         WHERE account_id = $1 AND request_digest = $2",
        &[&account.as_str(), &digest],
    )
    .await?;
    let stored = rules::StoredRequest {
        method: row.try_get(0).map_err(map_err)?,
        params: row.try_get(1).map_err(map_err)?,
        key_id: row.try_get(2).map_err(map_err)?,
        sealed: row.try_get(3).map_err(map_err)?,
        pepper_id: row.try_get(4).map_err(map_err)?,
    };
    let (key_id, sealed, pepper_id) = rules::replayed(stored, request)?;
    let key = load_key(c, account, &key_id)
        .await?
        .ok_or_else(|| StoreError::internal("a request id names a key that is gone"))?;
    Ok(Some(Replay {
        key,
        sealed,
        pepper_id,
    }))
}

/// Commits a transaction that changes something. The database may have
/// committed it when the connection breaks (or the server shuts down)
/// while COMMIT is under way, so such a failure is
/// [`OutageKind::CommitUnknown`]: the caller cannot tell whether the
/// change happened.
async fn commit(tx: Transaction<'_>) -> Result<()> {
    tx.commit().await.map_err(|e| match map_err(e) {
        StoreError::Unavailable(outage) => StoreError::Unavailable(Outage {
            kind: OutageKind::CommitUnknown,
            source: outage.source,
        }),
        other => other,
    })
}

/// Creates the account on first use and locks its row until the
/// transaction ends; returns it as stored.
async fn lock_account(
    c: &impl GenericClient,
    account: &AccountId,
    now: OffsetDateTime,
) -> Result<Account> {
    execute(
        c,
        "INSERT INTO accounts (account_id, tier, created_at) VALUES ($1, 'free', $2) ON CONFLICT DO NOTHING",
        &[&account.as_str(), &now],
    )
    .await?;
    let row = query_one(
        c,
        "SELECT tier, grantable_scopes FROM accounts WHERE account_id = $1 FOR UPDATE",
        &[&account.as_str()],
    )
    .await?;
    account_from_row(&row)
}

fn account_from_row(row: &Row) -> Result<Account> {
    let tier: String = row.try_get(0).map_err(map_err)?;
    let grantable: Option<Vec<String>> = row.try_get(1).map_err(map_err)?;
    rules::account(Some((tier, grantable)))
}

/// The cap check. The count runs after the account lock is held, so under
/// READ COMMITTED it sees every key committed by whoever held it before.
async fn check_room(
    c: &impl GenericClient,
    account: &AccountId,
    tier: Tier,
    now: OffsetDateTime,
    limits: TierLimits,
) -> Result<()> {
    let row = query_one(
        c,
        "SELECT COUNT(*) FROM keys WHERE account_id = $1 AND revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > $2)",
        &[&account.as_str(), &now],
    )
    .await?;
    rules::check_quota(tier, limits, count(&row)?)
}

/// Refuses to revoke or weaken `key` (an active management key) when no
/// other active key of its account is one. Call it with the account row
/// locked ([`lock_account`]): two management keys revoking each other at
/// once then serialize, and the second sees the first's revocation.
async fn keep_a_manager(
    c: &impl GenericClient,
    key: &KeyRecord,
    now: OffsetDateTime,
) -> Result<()> {
    let rows = query(
        c,
        "SELECT scopes FROM keys WHERE account_id = $1 AND key_id <> $2 AND revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > $3)",
        &[&key.account_id.as_str(), &key.key_id.as_str(), &now],
    )
    .await?;
    let lists = rows
        .iter()
        .map(|row| row.try_get::<_, Vec<String>>(0).map_err(map_err))
        .collect::<Result<Vec<_>>>()?;
    rules::check_not_last_manager(key, rules::count_managers(&lists)?)
}

/// Writes the change's audit event, chained onto the account's head (locked
/// until commit), moves the head, and appends its prefixes to the change
/// log. Call it last in a transaction (see [`publish_change`]).
async fn record_change(c: &impl GenericClient, record: &ChangeRecord<'_>) -> Result<()> {
    let account = record.account.as_str();
    let row = query_one(c, LOCK_HEAD, &[&account, &&GENESIS[..]]).await?;
    let head = Head::stored(
        row.try_get(0).map_err(map_err)?,
        row.try_get::<_, &[u8]>(1).map_err(map_err)?,
    )?;
    let link = chain::append(head, record);
    execute(
        c,
        INSERT_EVENT,
        &[
            &account,
            &link.seq,
            &record.key_id.map(KeyId::as_str),
            &record.action.as_str(),
            &record.actor.name,
            &record.actor.ip,
            &link.at,
            &Json(&link.changes),
            &&link.prev_hash[..],
            &&link.hash[..],
        ],
    )
    .await?;
    for prefix in &record.publish {
        publish_change(c, prefix, record.at).await?;
    }
    Ok(())
}

/// Decodes a row of [`AUDIT_CHAIN`]: an event (kind 0) or a head (kind 1).
fn chain_row_from_row(row: &Row) -> Result<AuditChainRow> {
    let kind: i32 = row.try_get(0).map_err(map_err)?;
    let account_id: String = row.try_get(1).map_err(map_err)?;
    let seq: Option<i64> = row.try_get(2).map_err(map_err)?;
    if kind == 1 {
        return Ok(AuditChainRow::Head(StoredAuditHead {
            account_id,
            seq: seq.unwrap_or_default(),
            hash: row.try_get(11).map_err(map_err)?,
        }));
    }
    let changes: Option<Json<serde_json::Value>> = row.try_get(9).ok();
    Ok(AuditChainRow::Event(StoredAuditEvent {
        row_id: row.try_get(3).map_err(map_err)?,
        account_id,
        seq,
        key_id: row.try_get(4).map_err(map_err)?,
        action: row.try_get(5).map_err(map_err)?,
        actor: row.try_get(6).map_err(map_err)?,
        actor_ip: row.try_get(7).map_err(map_err)?,
        at: row.try_get(8).map_err(map_err)?,
        changes: changes.map(|Json(c)| c),
        prev_hash: row.try_get(10).map_err(map_err)?,
        hash: row.try_get(11).map_err(map_err)?,
    }))
}

/// Appends `prefix` to the change log and notifies listeners at commit.
///
/// The advisory lock (held until commit) makes sequence numbers commit in
/// order: without it a transaction holding seq 5 could commit after one
/// holding seq 6, and a follower that already read 6 would never see 5.
/// Call it last in a transaction, after every row lock is taken.
async fn publish_change(
    c: &impl GenericClient,
    prefix: &KeyPrefix,
    at: OffsetDateTime,
) -> Result<()> {
    execute(c, "SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOG_LOCK]).await?;
    let row = query_one(
        c,
        "INSERT INTO key_changes (prefix, at) VALUES ($1, $2) RETURNING seq",
        &[&prefix.as_str(), &at],
    )
    .await?;
    let seq: i64 = row.try_get(0).map_err(map_err)?;
    execute(
        c,
        "SELECT pg_notify($1, $2)",
        &[&CHANGE_CHANNEL, &listen::notification_payload(seq, prefix)],
    )
    .await?;
    Ok(())
}

/// Decodes a row of [`stream::STREAM_PREFIXES`].
fn prefix_from_row(row: &Row) -> Result<KeyPrefix> {
    rules::field(
        "secret prefix",
        row.try_get::<_, &str>(0).map_err(map_err)?.parse(),
    )
}

/// Decodes a row of [`stream::STREAM_SECRETS`], borrowing its text until parsed.
fn entry_from_row(row: &Row) -> Result<SecretEntry> {
    let scopes: Vec<&str> = row.try_get(8).map_err(map_err)?;
    stream::RawEntry {
        prefix: row.try_get(0).map_err(map_err)?,
        hash: row.try_get(1).map_err(map_err)?,
        superseded: row.try_get(2).map_err(map_err)?,
        revoked: row.try_get(3).map_err(map_err)?,
        expires_at: row.try_get(4).map_err(map_err)?,
        key_id: row.try_get(5).map_err(map_err)?,
        account_id: row.try_get(6).map_err(map_err)?,
        name: row.try_get(7).map_err(map_err)?,
        scopes: &scopes,
        pepper_id: row.try_get(9).map_err(map_err)?,
    }
    .parse()
}

/// Reads `s.hash, s.superseded_at, s.pepper_id` and then the key columns,
/// from `offset`.
fn secret_from_row(row: &Row, offset: usize) -> Result<SecretRecord> {
    let hash: Vec<u8> = row.try_get(offset).map_err(map_err)?;
    Ok(SecretRecord {
        hash: SecretHash::from_slice(&hash)
            .ok_or_else(|| corrupt("hash")("not 32 bytes".into()))?,
        superseded_at: row.try_get(offset + 1).map_err(map_err)?,
        pepper_id: stream::pepper_id(row.try_get(offset + 2).map_err(map_err)?)?,
        key: key_from_row(row, offset + 3)?,
    })
}

/// The migration ledger on a transaction that holds [`MIGRATION_LOCK`].
struct Ledger<'a>(&'a deadpool_postgres::Transaction<'a>);

impl migrate::Ledger for Ledger<'_> {
    /// Looks before it creates or alters: `CREATE TABLE IF NOT EXISTS`
    /// needs CREATE on the schema and `ADD COLUMN IF NOT EXISTS` ownership
    /// even when there is nothing to do, and the service may run as a role
    /// with neither once the database is migrated (docs/SECURITY.md).
    async fn prepare(&mut self) -> Result<()> {
        let row = self
            .0
            .query_one(
                "SELECT to_regclass('schema_migrations') IS NOT NULL, EXISTS ( \
                     SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('schema_migrations') \
                     AND attname = 'checksum' AND NOT attisdropped)",
                &[],
            )
            .await
            .map_err(map_err)?;
        let (exists, has_checksum): (bool, bool) = (
            row.try_get(0).map_err(map_err)?,
            row.try_get(1).map_err(map_err)?,
        );
        if !exists {
            self.0.batch_execute(CREATE_LEDGER).await.map_err(map_err)?;
        } else if !has_checksum {
            self.0
                .batch_execute(
                    "ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum TEXT",
                )
                .await
                .map_err(map_err)?;
        }
        Ok(())
    }

    async fn applied(&mut self) -> Result<Vec<Applied>> {
        // Not prepared for the cache: the ledger's statements run once a start.
        let rows = self
            .0
            .query(
                "SELECT version, checksum FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                Ok(Applied {
                    version: row.try_get(0).map_err(map_err)?,
                    checksum: row.try_get(1).map_err(map_err)?,
                })
            })
            .collect()
    }

    async fn record_checksum(&mut self, version: i64, checksum: &str) -> Result<()> {
        self.0
            .execute(
                "UPDATE schema_migrations SET checksum = $1 WHERE version = $2",
                &[&checksum, &version],
            )
            .await
            .map_err(map_err)?;
        Ok(())
    }

    /// A thousand rows at a time in `event_id` order, each batch written
    /// with one statement, each account's running head in memory (one per
    /// account, not one per event).
    async fn chain_audit_events(&mut self) -> Result<u64> {
        let tx = self.0;
        let mut heads: std::collections::BTreeMap<String, Head> = Default::default();
        let (mut after, mut chained) = (0_i64, 0_u64);
        loop {
            let rows = tx
                .query(
                    "SELECT event_id, account_id, key_id, action, actor, actor_ip, at, changes \
                     FROM audit_events WHERE event_id > $1 AND hash IS NULL \
                     ORDER BY event_id LIMIT 1000",
                    &[&after],
                )
                .await
                .map_err(map_err)?;
            if rows.is_empty() {
                break;
            }
            let (mut ids, mut seqs, mut prevs, mut hashes) = (vec![], vec![], vec![], vec![]);
            for row in &rows {
                let Json(changes) = row
                    .try_get::<_, Json<serde_json::Value>>(7)
                    .map_err(|e| corrupt("audit changes")(e.to_string()))?;
                let event = StoredAuditEvent {
                    row_id: row.try_get(0).map_err(map_err)?,
                    account_id: row.try_get(1).map_err(map_err)?,
                    seq: None,
                    key_id: row.try_get(2).map_err(map_err)?,
                    action: row.try_get(3).map_err(map_err)?,
                    actor: row.try_get(4).map_err(map_err)?,
                    actor_ip: row.try_get(5).map_err(map_err)?,
                    at: row.try_get(6).map_err(map_err)?,
                    changes: None,
                    prev_hash: None,
                    hash: None,
                };
                let head = heads.entry(event.account_id.clone()).or_insert(Head::EMPTY);
                let next = chain::chain_stored(*head, &event, &changes);
                ids.push(event.row_id);
                seqs.push(next.seq);
                prevs.push(head.hash.to_vec());
                hashes.push(next.hash.to_vec());
                *head = next;
                after = event.row_id;
            }
            chained += ids.len() as u64;
            tx.execute(
                "UPDATE audit_events e SET account_seq = n.seq, prev_hash = n.prev, hash = n.hash \
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[]) \
                     AS n (id, seq, prev, hash) \
                 WHERE e.event_id = n.id",
                &[&ids, &seqs, &prevs, &hashes],
            )
            .await
            .map_err(map_err)?;
        }
        let accounts: Vec<&str> = heads.keys().map(String::as_str).collect();
        let seqs: Vec<i64> = heads.values().map(|h| h.seq).collect();
        let hashes: Vec<&[u8]> = heads.values().map(|h| &h.hash[..]).collect();
        tx.execute(
            "INSERT INTO audit_heads (account_id, last_seq, last_hash) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bytea[])",
            &[&accounts, &seqs, &hashes],
        )
        .await
        .map_err(map_err)?;
        Ok(chained)
    }

    async fn apply(&mut self, m: &Migration, checksum: &str, at: &str) -> Result<()> {
        self.0
            .batch_execute(m.sql)
            .await
            .map_err(|e| migrate::failed(m, e))?;
        self.0
            .execute(
                "INSERT INTO schema_migrations (version, name, applied_at, checksum) \
                 VALUES ($1, $2, $3, $4)",
                &[&m.version, &m.name, &at, &checksum],
            )
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

#[async_trait]
impl KeySource for PostgresStore {
    async fn find_secret(&self, prefix: &KeyPrefix) -> Result<Option<SecretRecord>> {
        let client = self.client().await?;
        query_opt(&client, FIND_SECRET, &[&prefix.as_str()])
            .await?
            .map(|row| secret_from_row(&row, 0))
            .transpose()
    }

    async fn record_usage(&self, usage: &[UsageRecord]) -> Result<()> {
        if usage.is_empty() {
            return Ok(());
        }
        let key_ids: Vec<&str> = usage.iter().map(|u| u.key_id.as_str()).collect();
        let ats: Vec<OffsetDateTime> = usage.iter().map(|u| u.at).collect();
        let ips: Vec<Option<&str>> = usage.iter().map(|u| u.ip.as_deref()).collect();
        let client = self.client().await?;
        execute(&client, RECORD_USAGE, &[&key_ids, &ats, &ips]).await?;
        Ok(())
    }

    async fn rehash_secrets(&self, rehashes: &[Rehash]) -> Result<Vec<KeyPrefix>> {
        if rehashes.is_empty() {
            return Ok(Vec::new());
        }
        let prefixes: Vec<&str> = rehashes.iter().map(|r| r.prefix.as_str()).collect();
        let old_hashes: Vec<&[u8]> = rehashes
            .iter()
            .map(|r| &r.old_hash.as_bytes()[..])
            .collect();
        let old_peppers: Vec<Option<i64>> = rehashes
            .iter()
            .map(|r| r.old_pepper_id.map(PepperId::to_stored))
            .collect();
        let new_hashes: Vec<&[u8]> = rehashes
            .iter()
            .map(|r| &r.new_hash.as_bytes()[..])
            .collect();
        let new_peppers: Vec<i64> = rehashes
            .iter()
            .map(|r| r.new_pepper_id.to_stored())
            .collect();
        let client = self.client().await?;
        let rows = query(
            &client,
            REHASH_SECRETS,
            &[
                &prefixes,
                &old_hashes,
                &old_peppers,
                &new_hashes,
                &new_peppers,
            ],
        )
        .await?;
        rows.iter()
            .map(|row| {
                let prefix: &str = row.try_get(0).map_err(map_err)?;
                rules::field("secret prefix", prefix.parse())
            })
            .collect()
    }

    async fn change_sequence(&self) -> Result<i64> {
        let client = self.client().await?;
        let row = query_one(
            &client,
            "SELECT COALESCE(MAX(seq), 0) FROM key_changes",
            &[],
        )
        .await?;
        row.try_get(0).map_err(map_err)
    }

    async fn changes_since(&self, seq: i64, limit: u32) -> Result<Vec<(i64, KeyPrefix)>> {
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT seq, prefix FROM key_changes WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&seq, &i64::from(limit)],
        )
        .await?;
        let changes = rows
            .iter()
            .map(|row| {
                let seq: i64 = row.try_get(0).map_err(map_err)?;
                let prefix: String = row.try_get(1).map_err(map_err)?;
                Ok((seq, rules::field("change prefix", prefix.parse())?))
            })
            .collect::<Result<Vec<_>>>()?;
        // Read after the changes: a prune in between can only make this
        // refuse changes it read whole, never pass a gap.
        let floor = query_one(&client, "SELECT pruned_through FROM change_log_floor", &[]).await?;
        rules::check_not_pruned(seq, floor.try_get(0).map_err(map_err)?)?;
        Ok(changes)
    }

    /// Opens a connection of its own (not from the pool, which recycles
    /// connections and would lose the `LISTEN`), named
    /// `vilvik-keys-listener` in `pg_stat_activity`, and `LISTEN`s on
    /// [`CHANGE_CHANNEL`]. Every change committed after this returns is
    /// delivered, in sequence order.
    ///
    /// A spawned task owns the connection: it forwards notifications and,
    /// after [`ListenerOptions::heartbeat`] without traffic (5 s by
    /// default), checks that the server still answers. When the connection
    /// ends, fails or gives no answer within
    /// [`ListenerOptions::heartbeat_timeout`] (another 5 s), or the
    /// consumer falls 65,536 notifications behind, the task
    /// ends and [`ChangeListener::next`] fails as
    /// [`StoreError::Unavailable`] once it has handed out what arrived
    /// before. Dropping the listener closes the connection.
    async fn listen(&self) -> Result<Option<Box<dyn ChangeListener>>> {
        listen::subscribe(&self.config, &self.tls, self.listener)
            .await
            .map(Some)
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

impl PostgresStore {
    /// One query on a pooled connection, its rows streamed (never all in
    /// memory) and decoded by a task of its own that sends batches to the
    /// caller as it goes. One statement is one snapshot, so the read is
    /// consistent; it runs in a transaction of its own only to lift the
    /// statement timeout, since streaming a million rows to a slow sink
    /// rightly takes longer than a request.
    async fn stream_rows<T: Send + 'static>(
        &self,
        query: &'static str,
        params: Vec<Option<String>>,
        batch: usize,
        decode: fn(&Row) -> Result<T>,
        sink: &mut (dyn FnMut(Vec<T>) + Send),
    ) -> Result<usize> {
        let mut client = self.client().await?;
        let (tx, rx) = mpsc::channel(stream::BUFFERED_BATCHES);
        let producer = tokio::spawn(async move {
            let read = client.transaction().await.map_err(map_err)?;
            read.batch_execute(NO_STATEMENT_TIMEOUT)
                .await
                .map_err(map_err)?;
            // Prepared (and cached), so rows decode by the statement's
            // column types without a lookup.
            let stmt = read.prepare_cached(query).await.map_err(map_err)?;
            let rows = read.query_raw(&stmt, params).await.map_err(map_err)?;
            let mut rows = std::pin::pin!(rows);
            let mut batches = stream::Batcher::new(batch);
            while let Some(row) = rows.try_next().await.map_err(map_err)? {
                if let Some(full) = batches.push(decode(&row)?)
                    && tx.send(full).await.is_err()
                {
                    return Ok(()); // the caller gave up
                }
            }
            if let Some(rest) = batches.rest() {
                let _ = tx.send(rest).await;
            }
            // The connection goes back to the pool only now, with the
            // query done.
            read.commit().await.map_err(map_err)
        });
        stream::drain(rx, producer, sink).await
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<usize> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        tx.batch_execute(NO_STATEMENT_TIMEOUT)
            .await
            .map_err(map_err)?;
        // Replicas starting together wait here; the second finds nothing to do.
        execute(&tx, "SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        let applied = migrate::run(&mut Ledger(&tx), POSTGRES).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(applied)
    }

    async fn create_key_with(
        &self,
        new: NewKey,
        request: Option<&RequestRecord>,
        actor: &Actor,
        policy: &Policy,
    ) -> Result<Outcome<KeyRecord>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        if let Some(request) = request
            && let Some(replay) =
                claim_request(&tx, &new.account_id, request, new.created_at).await?
        {
            return Ok(Outcome::Replayed(Box::new(replay)));
        }
        let account = lock_account(&tx, &new.account_id, new.created_at).await?;
        let grantable = account.grantable.as_ref().unwrap_or(&policy.grantable);
        rules::check_grants(None, &new.scopes, grantable, actor)?;
        let stored = query_one(
            &tx,
            "SELECT COUNT(*) FROM keys WHERE account_id = $1",
            &[&new.account_id.as_str()],
        )
        .await?;
        rules::check_stored(account.tier, policy, count(&stored)?)?;
        check_room(
            &tx,
            &new.account_id,
            account.tier,
            new.created_at,
            policy.tiers,
        )
        .await?;
        execute(
            &tx,
            "INSERT INTO keys (key_id, account_id, name, description, scopes, prefix, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &new.key_id.as_str(),
                &new.account_id.as_str(),
                &new.name.as_str(),
                &new.description.as_str(),
                &new.scopes.to_strings(),
                &new.prefix.as_str(),
                &new.created_at,
                &new.expires_at,
            ],
        )
        .await?;
        execute(
            &tx,
            INSERT_SECRET,
            &[
                &new.prefix.as_str(),
                &new.key_id.as_str(),
                &&new.hash.as_bytes()[..],
                &new.pepper_id.to_stored(),
                &new.created_at,
            ],
        )
        .await?;
        record_change(&tx, &ChangeRecord::created(&new, actor)).await?;
        let key = load_key(&tx, &new.account_id, &new.key_id)
            .await?
            .ok_or_else(|| StoreError::internal("created key vanished"))?;
        commit(tx).await?;
        Ok(Outcome::Done(key))
    }

    async fn get_key(&self, account: &AccountId, key_id: &KeyId) -> Result<Option<KeyRecord>> {
        let client = self.client().await?;
        load_key(&client, account, key_id).await
    }

    async fn list_keys(
        &self,
        account: &AccountId,
        include_revoked: bool,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<KeyRecord>> {
        let client = self.client().await?;
        let rows = query(
            &client,
            LIST_KEYS,
            &[
                &account.as_str(),
                &after.unwrap_or(0),
                &include_revoked,
                &(i64::from(limit) + 1),
            ],
        )
        .await?;
        let items = rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get::<_, i64>(0).map_err(map_err)?,
                    key_from_row(row, 1)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(page(items, limit))
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
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        let before = load_key_for_change(&tx, account, key_id, changes.if_version).await?;
        let Some(update) = rules::plan_update(&before, changes, now) else {
            tx.commit().await.map_err(map_err)?;
            return Ok(before);
        };
        // Only what needs the account waits for its lock.
        if update.needs_account() {
            let stored = lock_account(&tx, account, now).await?;
            let grantable = stored.grantable.as_ref().unwrap_or(&policy.grantable);
            rules::check_grants(Some(&before.scopes), &update.after.scopes, grantable, actor)?;
            if update.weakens_manager {
                keep_a_manager(&tx, &before, now).await?;
            }
            if update.needs_room {
                check_room(&tx, account, stored.tier, now, policy.tiers).await?;
            }
        }
        let rules::Update { after, diff, .. } = update;
        execute(
            &tx,
            "UPDATE keys SET name = $1, description = $2, scopes = $3, expires_at = $4, \
             version = $5 WHERE key_id = $6",
            &[
                &after.name.as_str(),
                &after.description.as_str(),
                &after.scopes.to_strings(),
                &after.expires_at,
                &after.version,
                &key_id.as_str(),
            ],
        )
        .await?;
        record_change(&tx, &ChangeRecord::updated(&after, diff, actor, now)).await?;
        commit(tx).await?;
        Ok(after)
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
        let secret = &rotation.secret;
        let prefix = &secret.prefix;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        if let Some(request) = &rotation.request
            && let Some(replay) = claim_request(&tx, account, request, now).await?
        {
            return Ok(Outcome::Replayed(Box::new(replay)));
        }
        let before = load_key_for_change(&tx, account, key_id, rotation.if_version).await?;
        rules::ensure_rotatable(&before, now)?;
        execute(
            &tx,
            "UPDATE key_secrets SET superseded_at = $1 WHERE prefix = $2",
            &[&now, &before.prefix.as_str()],
        )
        .await?;
        execute(
            &tx,
            INSERT_SECRET,
            &[
                &prefix.as_str(),
                &key_id.as_str(),
                &&secret.hash.as_bytes()[..],
                &secret.pepper_id.to_stored(),
                &now,
            ],
        )
        .await?;
        let pruned = query(
            &tx,
            PRUNE_KEY_SECRETS,
            &[&key_id.as_str(), &i64::from(policy.rotated_secrets_kept)],
        )
        .await?
        .iter()
        .map(prefix_from_row)
        .collect::<Result<Vec<_>>>()?;
        execute(
            &tx,
            "UPDATE keys SET prefix = $1, rotated_at = $2, version = version + 1 WHERE key_id = $3",
            &[&prefix.as_str(), &now, &key_id.as_str()],
        )
        .await?;
        // The pruned secrets are published too: a node that cached one
        // must forget it, or it answers from memory for good.
        let mut record = ChangeRecord::rotated(&before, prefix, actor, now);
        record.publish.extend(&pruned);
        record_change(&tx, &record).await?;
        let key = load_key(&tx, account, key_id)
            .await?
            .ok_or_else(|| StoreError::internal("rotated key vanished"))?;
        commit(tx).await?;
        Ok(Outcome::Done(Rotation {
            key,
            replaced_prefix: before.prefix,
            pruned_prefixes: pruned,
        }))
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
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        let before = load_key_for_change(&tx, account, key_id, if_version).await?;
        if rules::is_active_manager(&before, now) {
            lock_account(&tx, account, now).await?;
            keep_a_manager(&tx, &before, now).await?;
        }
        execute(
            &tx,
            "UPDATE keys SET revoked_at = $1, revoke_reason = $2, version = version + 1 WHERE key_id = $3",
            &[&now, &reason, &key_id.as_str()],
        )
        .await?;
        record_change(&tx, &ChangeRecord::revoked(&before, reason, actor, now)).await?;
        let key = load_key(&tx, account, key_id)
            .await?
            .ok_or_else(|| StoreError::internal("revoked key vanished"))?;
        commit(tx).await?;
        Ok(key)
    }

    async fn list_audit_events(
        &self,
        account: &AccountId,
        key_id: Option<&KeyId>,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<AuditEvent>> {
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT account_seq, key_id, action, actor, actor_ip, at, changes FROM audit_events \
             WHERE account_id = $1 AND ($2::text IS NULL OR key_id = $2::text) AND account_seq > $3 \
             ORDER BY account_seq LIMIT $4",
            &[
                &account.as_str(),
                &key_id.map(KeyId::as_str),
                &after.unwrap_or(0),
                &(i64::from(limit) + 1),
            ],
        )
        .await?;
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            let event_id: i64 = row.try_get(0).map_err(map_err)?;
            let key_id: Option<String> = row.try_get(1).map_err(map_err)?;
            let action: String = row.try_get(2).map_err(map_err)?;
            let Json(changes) = row
                .try_get::<_, Json<Vec<FieldChange>>>(6)
                .map_err(|e| corrupt("audit changes")(e.to_string()))?;
            let event = AuditEvent {
                event_id,
                account_id: account.clone(),
                key_id: rules::field(
                    "audit key id",
                    key_id.map(|k| k.parse::<KeyId>()).transpose(),
                )?,
                action: action.parse().map_err(corrupt("audit action"))?,
                actor: row.try_get(3).map_err(map_err)?,
                actor_ip: row.try_get(4).map_err(map_err)?,
                at: row.try_get(5).map_err(map_err)?,
                changes,
            };
            items.push((event_id, event));
        }
        Ok(page(items, limit))
    }

    async fn get_account(&self, account: &AccountId) -> Result<Account> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT tier, grantable_scopes FROM accounts WHERE account_id = $1",
            &[&account.as_str()],
        )
        .await?;
        match row {
            Some(row) => account_from_row(&row),
            None => rules::account(None),
        }
    }

    async fn set_tier(
        &self,
        account: &AccountId,
        tier: Tier,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Account> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        let mut stored = lock_account(&tx, account, now).await?;
        if stored.tier != tier {
            execute(
                &tx,
                "UPDATE accounts SET tier = $1 WHERE account_id = $2",
                &[&tier.as_str(), &account.as_str()],
            )
            .await?;
            record_change(
                &tx,
                &ChangeRecord::tier_changed(account, stored.tier, tier, actor, now),
            )
            .await?;
            stored.tier = tier;
        }
        commit(tx).await?;
        Ok(stored)
    }

    async fn set_grantable_scopes(
        &self,
        account: &AccountId,
        grantable: Option<&ScopeCatalogue>,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Account> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        let mut stored = lock_account(&tx, account, now).await?;
        if stored.grantable.as_ref() != grantable {
            execute(
                &tx,
                "UPDATE accounts SET grantable_scopes = $1 WHERE account_id = $2",
                &[
                    &grantable.map(ScopeCatalogue::to_strings),
                    &account.as_str(),
                ],
            )
            .await?;
            record_change(
                &tx,
                &ChangeRecord::grantable_changed(
                    account,
                    stored.grantable.as_ref(),
                    grantable,
                    actor,
                    now,
                ),
            )
            .await?;
            stored.grantable = grantable.cloned();
        }
        commit(tx).await?;
        Ok(stored)
    }

    async fn prune_requests(&self, now: OffsetDateTime) -> Result<u64> {
        let client = self.client().await?;
        execute(
            &client,
            "DELETE FROM requests WHERE expires_at <= $1",
            &[&now],
        )
        .await
    }

    async fn prune_rotated_secrets(&self, before: OffsetDateTime) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        // A week of rotations may take a while to delete.
        tx.batch_execute(NO_STATEMENT_TIMEOUT)
            .await
            .map_err(map_err)?;
        let pruned = query(
            &tx,
            "DELETE FROM key_secrets WHERE superseded_at IS NOT NULL AND superseded_at < $1 \
             RETURNING prefix",
            &[&before],
        )
        .await?
        .iter()
        .map(prefix_from_row)
        .collect::<Result<Vec<_>>>()?;
        // Published, so that nodes caching them forget them (last: the
        // change-log lock is held from the first until commit).
        let now = OffsetDateTime::now_utc();
        for prefix in &pruned {
            publish_change(&tx, prefix, now).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(pruned.len() as u64)
    }

    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        // A week of changes may take a while to delete.
        tx.batch_execute(NO_STATEMENT_TIMEOUT)
            .await
            .map_err(map_err)?;
        // Publishers append under this lock: none commits a change while the
        // floor moves.
        execute(&tx, "SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOG_LOCK]).await?;
        let row = query_one(
            &tx,
            "SELECT MAX(seq) FROM key_changes \
             WHERE at < $1 AND seq < (SELECT MAX(seq) FROM key_changes)",
            &[&before],
        )
        .await?;
        let last_old = row.try_get::<_, Option<i64>>(0).map_err(map_err)?;
        let floor = query_one(&tx, "SELECT pruned_through FROM change_log_floor", &[]).await?;
        let floor = floor.try_get(0).map_err(map_err)?;
        let Some(Prune { through, floor }) = rules::plan_prune(last_old, floor) else {
            return Ok(0);
        };
        let pruned = execute(&tx, "DELETE FROM key_changes WHERE seq <= $1", &[&through]).await?;
        execute(
            &tx,
            "UPDATE change_log_floor SET pruned_through = $1",
            &[&floor],
        )
        .await?;
        tx.commit().await.map_err(map_err)?;
        Ok(pruned)
    }

    /// One statement per table, the rows passed as arrays (10,000 keys
    /// take about half a second). No `NOTIFY`, not even one per call:
    /// imported keys are new prefixes that no node holds as valid, so
    /// nothing needs evicting at once. Followers catch up through the
    /// sequence: the next change's notification carries a sequence number
    /// past the import, and `changes_since` from the last one seen returns
    /// the imported prefixes. Until then a node may still answer from a
    /// negative cache entry for an imported prefix (at most its negative
    /// TTL).
    async fn import_keys(&self, keys: Vec<NewKey>, actor: &Actor) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let key_ids: Vec<&str> = keys.iter().map(|k| k.key_id.as_str()).collect();
        let account_ids: Vec<&str> = keys.iter().map(|k| k.account_id.as_str()).collect();
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        let descriptions: Vec<&str> = keys.iter().map(|k| k.description.as_str()).collect();
        let scopes: Vec<String> = keys
            .iter()
            .map(|k| k.scopes.to_strings().join(" "))
            .collect();
        let prefixes: Vec<&str> = keys.iter().map(|k| k.prefix.as_str()).collect();
        let created: Vec<OffsetDateTime> = keys.iter().map(|k| k.created_at).collect();
        let expires: Vec<Option<OffsetDateTime>> = keys.iter().map(|k| k.expires_at).collect();
        let hashes: Vec<&[u8]> = keys.iter().map(|k| &k.hash.as_bytes()[..]).collect();
        let peppers: Vec<i64> = keys.iter().map(|k| k.pepper_id.to_stored()).collect();

        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        // A large import rightly takes longer than one request's statement.
        tx.batch_execute(NO_STATEMENT_TIMEOUT)
            .await
            .map_err(map_err)?;
        execute(&tx, IMPORT_ACCOUNTS, &[&account_ids, &created]).await?;
        execute(
            &tx,
            IMPORT_KEYS,
            &[
                &key_ids,
                &account_ids,
                &names,
                &descriptions,
                &scopes,
                &prefixes,
                &created,
                &expires,
            ],
        )
        .await?;
        execute(
            &tx,
            IMPORT_SECRETS,
            &[&prefixes, &key_ids, &hashes, &peppers, &created],
        )
        .await?;
        // Each account's events chain on from its head, in input order.
        let mut accounts = account_ids.clone();
        accounts.sort_unstable();
        accounts.dedup();
        let mut heads = std::collections::HashMap::with_capacity(accounts.len());
        for row in query(&tx, IMPORT_LOCK_HEADS, &[&accounts, &&GENESIS[..]]).await? {
            let account: String = row.try_get(0).map_err(map_err)?;
            let head = Head::stored(
                row.try_get(1).map_err(map_err)?,
                row.try_get::<_, &[u8]>(2).map_err(map_err)?,
            )?;
            heads.insert(account, head);
        }
        let links: Vec<chain::Link> = keys
            .iter()
            .map(|key| {
                let head = heads
                    .get_mut(key.account_id.as_str())
                    .expect("every account's head was locked");
                let link = chain::append(*head, &ChangeRecord::created(key, actor));
                *head = link.head();
                link
            })
            .collect();
        let seqs: Vec<i64> = links.iter().map(|l| l.seq).collect();
        let ats: Vec<OffsetDateTime> = links.iter().map(|l| l.at).collect();
        let changes: Vec<Json<&serde_json::Value>> =
            links.iter().map(|l| Json(&l.changes)).collect();
        let prevs: Vec<&[u8]> = links.iter().map(|l| &l.prev_hash[..]).collect();
        let hashes_of_events: Vec<&[u8]> = links.iter().map(|l| &l.hash[..]).collect();
        execute(
            &tx,
            IMPORT_AUDIT,
            &[
                &AuditAction::Created.as_str(),
                &actor.name,
                &actor.ip,
                &account_ids,
                &seqs,
                &key_ids,
                &ats,
                &changes,
                &prevs,
                &hashes_of_events,
            ],
        )
        .await?;
        let head_accounts: Vec<&str> = heads.keys().map(String::as_str).collect();
        let head_seqs: Vec<i64> = heads.values().map(|h| h.seq).collect();
        let head_hashes: Vec<&[u8]> = heads.values().map(|h| &h.hash[..]).collect();
        execute(
            &tx,
            IMPORT_HEADS,
            &[&head_accounts, &head_seqs, &head_hashes],
        )
        .await?;
        // Last, as in `publish_change`: sequence numbers commit in order.
        execute(&tx, "SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOG_LOCK]).await?;
        execute(&tx, IMPORT_CHANGES, &[&prefixes, &created]).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn stream_audit_chain(
        &self,
        account: Option<&AccountId>,
        batch: usize,
        sink: &mut (dyn FnMut(Vec<AuditChainRow>) + Send),
    ) -> Result<usize> {
        let account = account.map(|a| a.as_str().to_owned());
        self.stream_rows(AUDIT_CHAIN, vec![account], batch, chain_row_from_row, sink)
            .await
    }

    async fn secrets_by_pepper(&self) -> Result<Vec<PepperUse>> {
        let mut client = self.client().await?;
        // One scan of every secret: rightly longer than a request's statement.
        let tx = client.transaction().await.map_err(map_err)?;
        tx.batch_execute(NO_STATEMENT_TIMEOUT)
            .await
            .map_err(map_err)?;
        let rows = query(&tx, stream::SECRETS_BY_PEPPER, &[]).await?;
        let uses = rows
            .iter()
            .map(|row| {
                Ok(PepperUse {
                    pepper_id: stream::pepper_id(row.try_get(0).map_err(map_err)?)?,
                    live: row.try_get::<_, i64>(1).map_err(map_err)? as u64,
                    total: row.try_get::<_, i64>(2).map_err(map_err)? as u64,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        tx.commit().await.map_err(map_err)?;
        Ok(uses)
    }
}

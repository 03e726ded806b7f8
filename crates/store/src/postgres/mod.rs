//! The production backend: PostgreSQL through a deadpool connection pool.
//!
//! Several replicas share one database, so every rule that SQLite gets from
//! its single writer is taken explicitly here (the order of the locks is
//! `ops.rs`'s, written once for both backends):
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
//! changes in sequence order. [`crate::KeySource::listen`] subscribes on a
//! connection of its own, outside the pool.
//!
//! Both the pool and the listener connect with one rustls connector built
//! from the URL's `sslmode` and `sslrootcert` (`tls.rs`; the modes are
//! listed on [`PostgresStore::connect`]).
//!
//! Where things are: connecting, errors, the runners and the calls of the
//! verify engine here; the primitives of `db.rs` by the tables they serve
//! (`keys.rs` with the bulk `import.rs`, `accounts.rs`, `requests.rs`,
//! `audit.rs`, `feed.rs`); the migration ledger in `ledger.rs`; the change
//! listener in `listen.rs`.

mod accounts;
mod audit;
mod feed;
mod import;
mod keys;
mod ledger;
mod listen;
mod requests;
mod tls;

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    Transaction,
};
use time::OffsetDateTime;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql, Type};
use vilvik_keys_domain::{KeyPrefix, PepperId};

use crate::backend::{Backend, Stream};
use crate::db::BoxFuture;
use crate::rows::{self, Cells};
use crate::{
    ChangeListener, Outage, OutageKind, PepperUse, Rehash, Result, SecretRecord, StoreError,
    UsageRecord, stream,
};

pub use listen::ListenerOptions;

/// The `LISTEN`/`NOTIFY` channel on which every change publishes
/// `<seq>:<prefix>`: its change sequence number and the affected key
/// prefix. Verify nodes listen on it to evict cached entries.
pub const CHANGE_CHANNEL: &str = "vilvik_keys_changes";

/// Every grant the service's Postgres role needs, and no more, for a
/// database named `vilvik_keys` and a role named `vilvik_keys_service`
/// (docs/SECURITY.md shows this file as it is; a test holds them equal).
/// A migration that adds a table or a sequence adds its line here.
pub const SERVICE_GRANTS: &str = include_str!("grants.sql");

/// [`SERVICE_GRANTS`] for the database `database` and the role `role`.
pub fn service_grants(database: &str, role: &str) -> String {
    SERVICE_GRANTS
        .replace("vilvik_keys_service", role)
        .replace("\"vilvik_keys\"", &format!("\"{database}\""))
}

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
const NO_STATEMENT_TIMEOUT: &str = "SET LOCAL statement_timeout = 0";

/// Advisory lock ids (arbitrary constants, unique to this service).
/// NEVER CHANGE THESE while replicas of an older version may be running.
const MIGRATION_LOCK: i64 = 0x766b_6d69_6772_0001; // "vkmigr" 1
const CHANGE_LOG_LOCK: i64 = 0x766b_6368_6e67_0001; // "vkchng" 1

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
        // modes: they come out first, and tokio-postgres parses the rest.
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

    /// Whether the database holds the service's schema: a migration
    /// ledger with at least one entry.
    pub async fn has_schema(&self) -> Result<bool> {
        let client = self.client().await?;
        let ledger: bool = client
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await
            .map_err(map_err)?
            .try_get(0)
            .map_err(map_err)?;
        if !ledger {
            return Ok(false);
        }
        client
            .query_one("SELECT EXISTS (SELECT 1 FROM schema_migrations)", &[])
            .await
            .map_err(map_err)?
            .try_get(0)
            .map_err(map_err)
    }

    /// The database `url` names, for people: its name, host(s) and user,
    /// never a password. `None` when the URL does not parse.
    pub fn describe(url: &str) -> Option<String> {
        let (url, _) = tls::split(url).ok()?;
        let config: tokio_postgres::Config = url.parse().ok()?;
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let ports = config.get_ports();
                (
                    host,
                    ports.get(i).or(ports.first()).copied().unwrap_or(5432),
                )
            })
            .map(|(host, port)| match host {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                tokio_postgres::config::Host::Unix(dir) => format!("{}", dir.display()),
            })
            .collect();
        Some(format!(
            "Postgres database '{}' on {} as user '{}'",
            config.get_dbname().unwrap_or("(the user's)"),
            if hosts.is_empty() {
                "localhost".to_owned()
            } else {
                hosts.join(",")
            },
            config.get_user().unwrap_or("(the OS user)")
        ))
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

/// A statement's parameters.
type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Runs a statement, prepared once per connection and cached; returns how
/// many rows it changed.
async fn execute(c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<u64> {
    let stmt = c.prepare_cached(sql).await.map_err(map_err)?;
    c.execute(&stmt, params).await.map_err(map_err)
}

/// [`execute`], returning the rows.
async fn query(c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
    let stmt = c.prepare_cached(sql).await.map_err(map_err)?;
    c.query(&stmt, params).await.map_err(map_err)
}

/// [`execute`], returning the row, if any; more than one is an error.
async fn query_opt(c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
    let stmt = c.prepare_cached(sql).await.map_err(map_err)?;
    c.query_opt(&stmt, params).await.map_err(map_err)
}

/// [`execute`], returning the one row.
async fn query_one(c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<Row> {
    query_opt(c, sql, params)
        .await?
        .ok_or_else(|| StoreError::internal("a statement that returns a row returned none"))
}

impl Cells for Row {
    fn opt_text(&self, i: usize) -> Result<Option<&str>> {
        self.try_get(i).map_err(map_err)
    }

    /// `BIGINT`, or `INTEGER` (a literal such as `0 AS kind`).
    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        let int4 = self
            .columns()
            .get(i)
            .is_some_and(|c| *c.type_() == Type::INT4);
        if int4 {
            let value: Option<i32> = self.try_get(i).map_err(map_err)?;
            return Ok(value.map(i64::from));
        }
        self.try_get(i).map_err(map_err)
    }

    fn flag(&self, i: usize) -> Result<bool> {
        self.try_get(i).map_err(map_err)
    }

    fn opt_time(&self, i: usize) -> Result<Option<OffsetDateTime>> {
        self.try_get(i).map_err(map_err)
    }

    fn opt_bytes(&self, i: usize) -> Result<Option<&[u8]>> {
        self.try_get(i).map_err(map_err)
    }

    /// `TEXT[]`.
    fn opt_strings(&self, i: usize) -> Result<Option<Vec<&str>>> {
        self.try_get(i).map_err(map_err)
    }

    /// `JSONB`.
    fn json(&self, i: usize) -> Result<serde_json::Value> {
        let Json(value) = self.try_get(i).map_err(map_err)?;
        Ok(value)
    }
}

/// A pooled connection (`Pg<Object>`) or a transaction on one
/// (`Pg<Transaction>`) as the primitives of `db.rs` use it. Statements are
/// prepared once per connection and cached.
pub(crate) struct Pg<C>(C);

impl<C: GenericClient + Send> crate::db::Db for Pg<C> {
    async fn lift_statement_timeout(&mut self) -> Result<()> {
        self.0
            .batch_execute(NO_STATEMENT_TIMEOUT)
            .await
            .map_err(map_err)
    }
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

impl Backend for PostgresStore {
    type Tx<'c> = Pg<Transaction<'c>>;
    type Conn<'c> = Pg<Object>;

    async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'t, 'c> FnOnce(&'t mut Pg<Transaction<'c>>) -> BoxFuture<'t, T> + Send + 'static,
    {
        let mut client = self.client().await?;
        let mut tx = Pg(client.transaction().await.map_err(map_err)?);
        let out = op(&mut tx).await?;
        commit(tx.0).await?;
        Ok(out)
    }

    async fn read<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'t, 'c> FnOnce(&'t mut Pg<Object>) -> BoxFuture<'t, T> + Send + 'static,
    {
        op(&mut Pg(self.client().await?)).await
    }

    async fn migrate(&self) -> Result<usize> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        tx.batch_execute(NO_STATEMENT_TIMEOUT)
            .await
            .map_err(map_err)?;
        // Replicas starting together wait here; the second finds nothing to do.
        execute(&tx, "SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        let applied = ledger::run(&tx).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(applied)
    }

    async fn find_secret(&self, prefix: &KeyPrefix) -> Result<Option<SecretRecord>> {
        let client = self.client().await?;
        keys::find_secret(&client, prefix).await
    }

    async fn record_usage(&self, usage: &[UsageRecord]) -> Result<()> {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let key_ids: Vec<&str> = usage.iter().map(|u| u.key_id.as_str()).collect();
        let valid_uses: Vec<i64> = usage.iter().map(|u| count(u.valid_uses)).collect();
        let rejected_uses: Vec<i64> = usage.iter().map(|u| count(u.rejected_uses)).collect();
        let valid = || usage.iter().map(|u| u.valid.as_ref());
        let used_at: Vec<Option<OffsetDateTime>> = valid().map(|v| v.map(|v| v.at)).collect();
        let observed: Vec<Option<&str>> = valid()
            .map(|v| v.and_then(|v| v.observed_ip.as_deref()))
            .collect();
        let claimed: Vec<Option<&str>> = valid()
            .map(|v| v.and_then(|v| v.claimed_ip.as_deref()))
            .collect();
        let rejected = || usage.iter().map(|u| u.rejected.as_ref());
        let rejected_at: Vec<Option<OffsetDateTime>> =
            rejected().map(|r| r.map(|r| r.at)).collect();
        let rejected_ip: Vec<Option<&str>> = rejected()
            .map(|r| r.and_then(|r| r.observed_ip.as_deref()))
            .collect();
        let client = self.client().await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
            &key_ids,
            &valid_uses,
            &rejected_uses,
            &used_at,
            &observed,
            &claimed,
            &rejected_at,
            &rejected_ip,
        ];
        execute(&client, keys::RECORD_USAGE, &params).await?;
        Ok(())
    }

    async fn rehash_secrets(&self, rehashes: &[Rehash]) -> Result<Vec<KeyPrefix>> {
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
        let found = query(
            &client,
            keys::REHASH_SECRETS,
            &[
                &prefixes,
                &old_hashes,
                &old_peppers,
                &new_hashes,
                &new_peppers,
            ],
        )
        .await?;
        found.iter().map(rows::prefix).collect()
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

    async fn stream(&self, batch: usize, stream: Stream<'_>) -> Result<usize> {
        match stream {
            Stream::Secrets(sink) => {
                self.stream_rows(stream::STREAM_SECRETS, vec![], batch, rows::entry, sink)
                    .await
            }
            Stream::Prefixes(sink) => {
                self.stream_rows(stream::STREAM_PREFIXES, vec![], batch, rows::prefix, sink)
                    .await
            }
            Stream::AuditChain(account, sink) => {
                let params = vec![account.map(|a| a.as_str().to_owned())];
                self.stream_rows(audit::AUDIT_CHAIN, params, batch, rows::chain_row, sink)
                    .await
            }
        }
    }

    async fn secrets_by_pepper(&self) -> Result<Vec<PepperUse>> {
        let mut client = self.client().await?;
        // One scan of every secret: rightly longer than a request's statement.
        let tx = client.transaction().await.map_err(map_err)?;
        tx.batch_execute(NO_STATEMENT_TIMEOUT)
            .await
            .map_err(map_err)?;
        let found = query(&tx, stream::SECRETS_BY_PEPPER, &[]).await?;
        let uses = found.iter().map(rows::pepper_use).collect::<Result<_>>()?;
        tx.commit().await.map_err(map_err)?;
        Ok(uses)
    }
}

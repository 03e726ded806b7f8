//! Building and running the service: the store, the verify engine, the
//! services each listener serves, and the background work; [`Application::run_until`]
//! hands them to a [`Runtime`], which runs them and stops them in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use vilvik_keys_domain::{Clock, SystemClock};
use vilvik_keys_store::{PostgresOptions, Store};
use vilvik_keys_verify::{
    CacheConfig, FeedConfig, RehashConfig, UsageConfig, UsageRecorder, Verifier, VerifierConfig,
};

use crate::admin_server::key_admin_server::KeyAdminServer;
use crate::config::Config;
use crate::ext_authz_server::authorization_server::AuthorizationServer;
use crate::http_face::HttpFace;
use crate::runtime::{self, Listener, Routes, Runtime, bind};
use crate::server::admin::{AdminService, SmokeTest};
use crate::server::ext_authz::ExtAuthzService;
use crate::server::verify::VerifyService;
use crate::service;
use crate::service::rate_limit::{AdminRateLimiter, SWEEP_INTERVAL};
use crate::transport::connections::fit_connection_cap;
use crate::transport::tls::{self, Acceptor};
use crate::verify_server::key_verify_server::KeyVerifyServer;

/// Largest request message accepted, on every listener.
pub use crate::config::MAX_MESSAGE_BYTES;

/// Which listeners a process serves; verify nodes scale out on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    All,
    Admin,
    Verify,
}

/// A built service with its listeners bound, ready to run.
#[derive(Debug)]
pub struct Application {
    /// What the role serves: the admin listener first, then the verify one.
    listeners: Vec<Listener>,
    /// An admin node's background work.
    housekeeping: Option<Housekeeping>,
    usage: UsageRecorder,
    verifier: Verifier,
    config: Config,
    /// Each listener's connection cap, fitted to the descriptor limit.
    max_connections: usize,
}

/// What an admin node keeps tidy in the background: its store's history
/// (change log, rotated-away secrets, request ids) and its rate limiter's
/// memory.
#[derive(Debug)]
struct Housekeeping {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    rate_limits: AdminRateLimiter,
}

impl Application {
    /// Connects and migrates the store, and binds the listeners the role
    /// needs (port 0 picks a free port; see [`Application::admin_addr`]).
    pub async fn build(config: Config, role: Role) -> anyhow::Result<Self> {
        Self::build_with_clock(config, role, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(
        config: Config,
        role: Role,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        // Before anything else: a bad certificate should stop the start
        // at once, not after the store was migrated.
        let tls = |listener: &'static str, protocols| {
            config
                .tls
                .files(listener)
                .map(|files| Acceptor::load(listener, files, protocols))
                .transpose()
                .with_context(|| format!("cannot set up TLS for the {listener} API"))
        };
        let (admin_tls, verify_tls) = (
            tls("admin", tls::HTTP2)?,
            // The verify listener also has the HTTP face.
            tls("verify", tls::HTTP2_AND_HTTP1)?,
        );
        let store = open_store(&config).await?;
        let peppers = crate::pepper::load(&config, store.as_ref()).await?;
        crate::pepper::check_live_keys(&config, &peppers, store.as_ref()).await?;
        let peppers = Arc::new(peppers);
        let usage = UsageRecorder::new(
            store.clone(),
            UsageConfig {
                flush_interval: config.usage_flush_interval,
                ..UsageConfig::default()
            },
        );
        let verifier = Verifier::new(
            store.clone(),
            clock.clone(),
            usage.clone(),
            peppers,
            VerifierConfig {
                cache: CacheConfig {
                    negative_ttl: config.negative_cache_ttl,
                    ..CacheConfig::default()
                },
                feed: FeedConfig {
                    staleness_bound: config.staleness_bound,
                    consistency_check_interval: config.consistency_check_interval,
                    poll_interval: config.change_poll_interval,
                    retry_interval: config.change_feed_retry_interval,
                    fallback_poll_interval: config.change_fallback_poll,
                    deadline: config.store_timeout,
                },
                misses: config.verify_misses,
                // Written behind like usage, as often.
                rehash: RehashConfig {
                    flush_interval: config.usage_flush_interval,
                    ..RehashConfig::default()
                },
            },
        );
        // Where the change log stands before anything is cached: the
        // follower starts from here.
        verifier
            .mark_change_log_position()
            .await
            .context("cannot read the change log")?;
        let started = std::time::Instant::now();
        if config.preload && role != Role::Admin {
            let loaded = verifier.preload().await.context("cannot preload keys")?;
            tracing::info!(
                keys.loaded = loaded,
                duration_ms = started.elapsed().as_millis() as u64,
                "preloaded keys into memory"
            );
        } else {
            // So that a key nobody has costs no store access, on the
            // verify listener and in admin authentication alike.
            let known = verifier
                .load_known_prefixes()
                .await
                .context("cannot load the known key prefixes")?;
            tracing::info!(
                prefixes = known,
                duration_ms = started.elapsed().as_millis() as u64,
                "loaded the known key prefixes"
            );
        }

        let mut listeners = Vec::new();
        let verify_addr = match role {
            Role::All | Role::Verify => {
                let socket = bind(config.verify_addr, "verify").await?;
                let addr = socket.local_addr()?;
                let service = VerifyService {
                    verifier: verifier.clone(),
                    trusted_proxies: config.trusted_proxies.clone(),
                };
                let ext_authz = ExtAuthzService {
                    verifier: verifier.clone(),
                    trusted_proxies: config.trusted_proxies.clone(),
                    key_headers: config.http_key_headers.clone(),
                };
                let http_face = HttpFace::new(
                    verifier.clone(),
                    config.trusted_proxies.clone(),
                    config.http_key_headers.clone(),
                );
                listeners.push(Listener {
                    name: "verify",
                    socket,
                    routes: Routes::new()
                        .grpc(
                            KeyVerifyServer::new(service)
                                .max_decoding_message_size(MAX_MESSAGE_BYTES),
                        )
                        // Envoy's ext_authz check, beside KeyVerify.
                        .grpc(
                            AuthorizationServer::new(ext_authz)
                                .max_decoding_message_size(MAX_MESSAGE_BYTES),
                        )
                        .http(http_face.router()),
                    concurrency: config.verify_concurrency(),
                    tls: verify_tls,
                });
                addr
            }
            Role::Admin => config.verify_addr,
        };
        let mut housekeeping = None;
        if role != Role::Verify {
            let service = AdminService {
                service: service::Admin::new(
                    store.clone(),
                    clock.clone(),
                    verifier.clone(),
                    config.policy(),
                    config.operator_token.clone(),
                    AdminRateLimiter::new(config.admin_rates, store.clone(), clock.clone()),
                ),
                trusted_proxies: config.trusted_proxies.clone(),
                smoke_test: SmokeTest::new(
                    config.public_verify_addr(verify_addr),
                    config
                        .tls
                        .enabled()
                        .then_some(config.tls.public_ca_file.as_deref()),
                ),
            };
            housekeeping = Some(Housekeeping {
                store: store.clone(),
                clock,
                rate_limits: service.service.rate_limits().clone(),
            });
            let routes = Routes::new()
                .grpc(KeyAdminServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES));
            listeners.insert(
                0,
                Listener {
                    name: "admin",
                    socket: bind(config.admin_addr, "admin").await?,
                    routes,
                    concurrency: config.admin_concurrency(),
                    tls: admin_tls,
                },
            );
        }
        let max_connections =
            fit_connection_cap(config.listener_limits.max_connections, listeners.len());
        Ok(Self {
            listeners,
            housekeeping,
            usage,
            verifier,
            config,
            max_connections,
        })
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.addr("admin")
    }

    pub fn verify_addr(&self) -> Option<SocketAddr> {
        self.addr("verify")
    }

    /// Where the listener `name` listens, if the role serves it.
    fn addr(&self, name: &str) -> Option<SocketAddr> {
        let listener = self.listeners.iter().find(|l| l.name == name)?;
        listener.socket.local_addr().ok()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets requests
    /// in flight finish for up to the configured grace period, and flushes
    /// pending usage (see [`Runtime`]).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let config = &self.config;
        let mut runtime = Runtime::new(config, self.max_connections);
        for listener in self.listeners {
            runtime.serve(listener).await?;
        }
        if let Some(Housekeeping {
            store,
            clock,
            rate_limits,
        }) = self.housekeeping
        {
            let retention = Retention {
                change_log: config.change_log_retention,
                rotated_secrets: config.rotated_secret_retention,
            };
            runtime.spawn("history pruner", |stop| {
                prune_history(store, clock, retention, stop)
            });
            runtime.spawn("admin rate-limit sweeper", |stop| {
                runtime::every(SWEEP_INTERVAL, stop, move || {
                    rate_limits.sweep();
                    std::future::ready(())
                })
            });
        }
        let verifier = self.verifier.clone();
        runtime.spawn("change feed follower", |stop| async move {
            verifier.follow_changes(stop).await
        });
        let verifier = self.verifier;
        runtime.spawn("re-hash writer", |stop| async move {
            verifier.write_rehashes(stop).await
        });
        runtime.spawn_usage_writer(self.usage);
        runtime.run_until(shutdown).await
    }
}

/// How often an admin node prunes the change log.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// How long admin nodes keep what [`prune_history`] deletes.
struct Retention {
    change_log: Duration,
    rotated_secrets: Duration,
}

/// Deletes change-log entries, rotated-away secrets and request ids past
/// their retention, at start and then every [`PRUNE_INTERVAL`], until
/// `stop` resolves. Several admin nodes pruning at once is harmless. A
/// verify node that missed pruned changes clears its cache (see
/// `crates/verify/src/feed.rs`).
async fn prune_history(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    retention: Retention,
    stop: impl Future<Output = ()>,
) {
    runtime::every(PRUNE_INTERVAL, stop, || {
        prune_once(store.as_ref(), clock.as_ref(), &retention)
    })
    .await;
}

/// One pass of [`prune_history`]; a failure is logged and left for the
/// next pass.
async fn prune_once(store: &dyn Store, clock: &dyn Clock, retention: &Retention) {
    // A retention reaching before the calendar's start prunes nothing.
    let cut_off = |retention: Duration| {
        time::Duration::try_from(retention)
            .ok()
            .and_then(|r| clock.now().checked_sub(r))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    match store.prune_changes(cut_off(retention.change_log)).await {
        Ok(0) => {}
        Ok(pruned) => tracing::info!(pruned, "pruned the change log"),
        Err(e) => tracing::warn!(error = %e, "cannot prune the change log; trying again later"),
    }
    match store
        .prune_rotated_secrets(cut_off(retention.rotated_secrets))
        .await
    {
        Ok(0) => {}
        Ok(pruned) => {
            tracing::info!(pruned, "deleted rotated-away secrets past their retention")
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot delete old rotated-away secrets; trying again later")
        }
    }
    match store.prune_requests(clock.now()).await {
        Ok(0) => {}
        Ok(pruned) => tracing::info!(pruned, "deleted request ids past their 24-hour window"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot delete expired request ids; trying again later")
        }
    }
}

/// Opens the configured store, creating it when missing (an empty SQLite
/// file, or the schema in an empty Postgres database), and brings its
/// schema up to date: for `serve` and `migrate` only.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store = vilvik_keys_store::connect(
        config.database_url(),
        &config.sqlite_path,
        postgres_options(config),
    )
    .await
    .with_context(|| cannot_open(config))?;
    migrate(store).await
}

/// Opens the configured store, which must already exist (made by `serve`
/// or `migrate`), and applies any migration it lacks: for every command
/// but those two, so that one run in the wrong directory, or against the
/// wrong database, makes nothing there and says where it looked.
pub async fn open_existing_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    use vilvik_keys_store::{Missing, OpenExistingError};
    let opened = vilvik_keys_store::connect_existing(
        config.database_url(),
        &config.sqlite_path,
        postgres_options(config),
    )
    .await;
    let store = match opened {
        Ok(store) => store,
        Err(OpenExistingError::Store(e)) => {
            return Err(anyhow::Error::new(e).context(cannot_open(config)));
        }
        Err(OpenExistingError::Missing(missing)) => {
            let (what, setting) = match (&missing, config.database_url()) {
                (Missing::NoFile(_), _) => (
                    format!("there is no {}", store_description(config)),
                    "sqlite_path (VILVIK_KEYS_SQLITE_PATH) to the service's database file, or run \
                     it in the directory the service runs in",
                ),
                (Missing::NoSchema, None) => (
                    format!(
                        "the {} holds no vilvik-keys schema",
                        store_description(config)
                    ),
                    "sqlite_path (VILVIK_KEYS_SQLITE_PATH) to the service's database file",
                ),
                (Missing::NoSchema, Some(_)) => (
                    format!(
                        "the {} holds no vilvik-keys schema",
                        store_description(config)
                    ),
                    "DATABASE_URL to the service's database",
                ),
            };
            anyhow::bail!(
                "{what}: this command opens the service's store and never creates one. Point it at \
                 the service's store with the service's settings (its --config file, or set {setting}); \
                 `vilvik-keys migrate` or `vilvik-keys serve` makes a new one"
            );
        }
    };
    migrate(store).await
}

/// The store a configuration names, for people: the SQLite file's absolute
/// path, or the Postgres database, host and user (never a password).
pub fn store_description(config: &Config) -> String {
    match config.database_url() {
        Some(url) => vilvik_keys_store::PostgresStore::describe(url)
            .unwrap_or_else(|| "Postgres database named by DATABASE_URL".to_owned()),
        None => {
            let path = &config.sqlite_path;
            let absolute = std::fs::canonicalize(path)
                .or_else(|_| std::path::absolute(path))
                .unwrap_or_else(|_| path.clone());
            format!("SQLite database {}", absolute.display())
        }
    }
}

fn postgres_options(config: &Config) -> PostgresOptions {
    PostgresOptions {
        statement_timeout: config.store_timeout,
        listener: config.listener,
    }
}

fn cannot_open(config: &Config) -> String {
    match config.database_url() {
        Some(_) => "cannot connect to the Postgres database named by DATABASE_URL".to_owned(),
        None => format!(
            "cannot open the SQLite database {}",
            config.sqlite_path.display()
        ),
    }
}

/// Applies the migrations `store` lacks.
async fn migrate(store: Arc<dyn Store>) -> anyhow::Result<Arc<dyn Store>> {
    let applied = store
        .migrate()
        .await
        .context("cannot apply database migrations")?;
    if applied > 0 {
        tracing::info!(migrations = applied, "applied database migrations");
    }
    Ok(store)
}

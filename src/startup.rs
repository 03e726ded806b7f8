//! Building and running the service: store, verify engine, the two gRPC
//! listeners, and an orderly shutdown that drains requests and flushes
//! pending usage.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use vilvik_keys_domain::{Clock, SystemClock};
use vilvik_keys_store::{PostgresOptions, Store};
use vilvik_keys_verify::{
    CacheConfig, FeedConfig, RehashConfig, UsageConfig, UsageRecorder, Verifier, VerifierConfig,
};

use crate::admin_server::key_admin_server::KeyAdminServer;
use crate::config::Config;
use crate::proto;
use crate::server::admin::{AdminService, SmokeTest};
use crate::server::connections::{self, ActivityLayer, ConnectionLimits, Connections};
use crate::server::rate_limit::AdminRateLimiter;
use crate::server::tls::{self, Acceptor};
use crate::server::verify::VerifyService;
use crate::service;
use crate::verify_server::key_verify_server::KeyVerifyServer;

/// The standard health service, advertised by reflection on both listeners.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Largest request message accepted, on both listeners.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Largest header block (metadata) of a request, on both listeners
/// (`SETTINGS_MAX_HEADER_LIST_SIZE`; hyper's default, stated here).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

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
    admin: Option<(TcpListener, AdminService)>,
    verify: Option<(TcpListener, VerifyService)>,
    usage: UsageRecorder,
    verifier: Verifier,
    config: Config,
    /// Each listener's connection cap, fitted to the descriptor limit.
    max_connections: usize,
    /// Each listener's TLS, when it has it.
    admin_tls: Option<Acceptor>,
    verify_tls: Option<Acceptor>,
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
        let tls = |listener: &'static str| {
            config
                .tls
                .files(listener)
                .map(|files| Acceptor::load(listener, files))
                .transpose()
                .with_context(|| format!("cannot set up TLS for the {listener} API"))
        };
        let (admin_tls, verify_tls) = (tls("admin")?, tls("verify")?);
        let store = open_store(&config).await?;
        let peppers = Arc::new(crate::pepper::load(&config, store.as_ref()).await?);
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

        let verify = match role {
            Role::All | Role::Verify => Some((
                bind(config.verify_addr, "verify").await?,
                VerifyService {
                    verifier: verifier.clone(),
                    trusted_proxies: config.trusted_proxies.clone(),
                },
            )),
            Role::Admin => None,
        };
        let verify_addr = match &verify {
            Some((listener, _)) => listener.local_addr()?,
            None => config.verify_addr,
        };
        let admin = match role {
            Role::All | Role::Admin => Some((
                bind(config.admin_addr, "admin").await?,
                AdminService {
                    service: service::Admin::new(
                        store.clone(),
                        clock,
                        verifier.clone(),
                        config.policy(),
                        config.operator_token.clone(),
                        AdminRateLimiter::new(config.admin_rates, store.clone()),
                    ),
                    trusted_proxies: config.trusted_proxies.clone(),
                    smoke_test: SmokeTest::new(
                        config.public_verify_addr(verify_addr),
                        config
                            .tls
                            .enabled()
                            .then_some(config.tls.public_ca_file.as_deref()),
                    ),
                },
            )),
            Role::Verify => None,
        };
        let max_connections = fit_connection_cap(
            config.listener_limits.max_connections,
            usize::from(admin.is_some()) + usize::from(verify.is_some()),
        );
        Ok(Self {
            admin,
            verify,
            usage,
            verifier,
            config,
            max_connections,
            admin_tls,
            verify_tls,
        })
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn verify_addr(&self) -> Option<SocketAddr> {
        self.verify.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets requests
    /// in flight finish for up to the configured grace period, and flushes
    /// pending usage.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        // Each listener advertises only what it serves.
        let reflection = |service: &'static str| -> anyhow::Result<_> {
            let builder = || {
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .with_service_name(service)
                    .with_service_name(HEALTH_SERVICE)
            };
            Ok((builder().build_v1()?, builder().build_v1alpha()?))
        };
        let mut servers = tokio::task::JoinSet::new();
        let mut pruner = None;
        let mut rate_limit_sweeper = None;
        let limits = self.config.listener_limits;
        let connection_limits = ConnectionLimits::new(&limits, self.max_connections);
        let mut listeners = Vec::new();
        if let Some((listener, service)) = self.admin {
            pruner = Some(tokio::spawn(prune_history(
                service.service.store().clone(),
                service.service.clock().clone(),
                Retention {
                    change_log: self.config.change_log_retention,
                    rotated_secrets: self.config.rotated_secret_retention,
                },
                stopped(),
            )));
            rate_limit_sweeper = Some(tokio::spawn(
                service.service.rate_limits().clone().housekeep(stopped()),
            ));
            health_reporter
                .set_serving::<KeyAdminServer<AdminService>>()
                .await;
            let addr = listener.local_addr()?;
            let (reflection_v1, reflection_v1alpha) =
                reflection(<KeyAdminServer<AdminService> as NamedService>::NAME)?;
            let connections = Connections::new("admin", connection_limits);
            listeners.push(connections.clone());
            let router = server(&self.config)
                .layer(ActivityLayer::new(limits.admin_concurrency_per_connection))
                .layer(tower::ServiceBuilder::new().load_shed().layer(
                    tower::limit::GlobalConcurrencyLimitLayer::new(limits.admin_concurrency_limit),
                ))
                .add_service(health_service.clone())
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(
                    KeyAdminServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES),
                );
            tracing::info!(listener = "admin", %addr, tls = tls_mode(self.admin_tls.as_ref()), "listening");
            servers.spawn(router.serve_with_incoming_shutdown(
                tls::Incoming::new(
                    connections.incoming(incoming(listener)),
                    self.admin_tls.clone(),
                ),
                stopped(),
            ));
        }
        if let Some((listener, service)) = self.verify {
            health_reporter
                .set_serving::<KeyVerifyServer<VerifyService>>()
                .await;
            let addr = listener.local_addr()?;
            let (reflection_v1, reflection_v1alpha) =
                reflection(<KeyVerifyServer<VerifyService> as NamedService>::NAME)?;
            // Fail fast when saturated instead of queueing without bound.
            let connections = Connections::new("verify", connection_limits);
            listeners.push(connections.clone());
            let router = server(&self.config)
                .layer(ActivityLayer::new(limits.verify_concurrency_per_connection))
                .layer(tower::ServiceBuilder::new().load_shed().layer(
                    tower::limit::GlobalConcurrencyLimitLayer::new(
                        self.config.verify_concurrency_limit,
                    ),
                ))
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(
                    KeyVerifyServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES),
                );
            tracing::info!(listener = "verify", %addr, tls = tls_mode(self.verify_tls.as_ref()), "listening");
            servers.spawn(router.serve_with_incoming_shutdown(
                tls::Incoming::new(
                    connections.incoming(incoming(listener)),
                    self.verify_tls.clone(),
                ),
                stopped(),
            ));
        }
        let tls_watcher = tokio::spawn(tls::watch(
            self.admin_tls
                .iter()
                .chain(&self.verify_tls)
                .cloned()
                .collect(),
            self.config.tls.reload_interval,
            stopped(),
        ));

        let verifier = self.verifier.clone();
        let follower_stop = stopped();
        let follower = tokio::spawn(async move { verifier.follow_changes(follower_stop).await });
        let rehasher = self.verifier.clone();
        let rehasher_stop = stopped();
        let rehashes = tokio::spawn(async move { rehasher.write_rehashes(rehasher_stop).await });

        let usage = self.usage.clone();
        let (flushed_tx, flushed_rx) = tokio::sync::oneshot::channel::<()>();
        let usage_task = tokio::spawn(usage.clone().run(async move {
            let _ = flushed_rx.await;
        }));

        // Serve until asked to stop, or until a listener fails.
        let mut failure = None;
        tokio::select! {
            () = shutdown => tracing::info!("shutting down: draining requests"),
            Some(result) = servers.join_next() => {
                failure = Some(result.map_err(anyhow::Error::from).and_then(|r| r.map_err(anyhow::Error::from)));
            }
        }
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let _ = stop_tx.send(true);
        // Connections that never sent a request get no GOAWAY to wait for.
        for connections in &listeners {
            connections.close_unused();
        }
        // The grace period covers draining requests and the final flush.
        let deadline = tokio::time::Instant::now() + self.config.shutdown_grace;
        let drained = tokio::time::timeout_at(deadline, async {
            while servers.join_next().await.is_some() {}
        })
        .await;
        let mut abandoned = Abandoned::default();
        if drained.is_err() {
            abandoned.requests = listeners.iter().map(Connections::requests_in_flight).sum();
            tracing::warn!(
                grace_ms = self.config.shutdown_grace.as_millis() as u64,
                requests = abandoned.requests,
                "requests still running after the grace period; stopping anyway"
            );
            servers.abort_all();
        }
        let _ = follower.await;
        let _ = tls_watcher.await;
        let _ = rehashes.await;
        if let Some(pruner) = pruner {
            let _ = pruner.await;
        }
        if let Some(sweeper) = rate_limit_sweeper {
            let _ = sweeper.await;
        }
        // Every verify has finished: flush what they recorded, retrying
        // until the deadline (at least one try, however late).
        let _ = flushed_tx.send(());
        usage_task.await.context("usage flusher panicked")?;
        let last_try = tokio::time::Instant::now() + MIN_FINAL_FLUSH;
        abandoned.usage_records = usage.flush_before(deadline.max(last_try)).await;
        if abandoned.any() {
            tracing::error!(
                requests = abandoned.requests,
                usage_records = abandoned.usage_records,
                "stopped, abandoning work"
            );
        } else {
            tracing::info!("stopped");
        }
        match failure {
            Some(Err(e)) => Err(e.context("a listener failed")),
            _ if abandoned.any() => Err(abandoned.into()),
            _ => Ok(()),
        }
    }
}

/// The final usage flush gets at least this long, even when draining
/// requests used up the grace period.
const MIN_FINAL_FLUSH: Duration = Duration::from_millis(500);

/// What a shutdown gave up on when its grace period ran out. `serve`
/// exits with [`Abandoned::EXIT_CODE`] when it is returned.
#[derive(Debug, Default, thiserror::Error)]
#[error(
    "stopped after the grace period, abandoning {requests} requests in flight and the last uses of {usage_records} keys"
)]
pub struct Abandoned {
    pub requests: usize,
    pub usage_records: usize,
}

impl Abandoned {
    /// Distinct from 1 (failed to start or serve): stopped, but lost work.
    pub const EXIT_CODE: u8 = 3;

    fn any(&self) -> bool {
        self.requests > 0 || self.usage_records > 0
    }
}

/// How often an admin node prunes the change log.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// How long admin nodes keep what [`prune_history`] deletes.
struct Retention {
    change_log: Duration,
    rotated_secrets: Duration,
}

/// Deletes change-log entries and rotated-away secrets older than their
/// retention, at start and then every [`PRUNE_INTERVAL`], until `stop`
/// resolves. Several admin nodes pruning at once is harmless. A verify node
/// that missed pruned changes clears its cache (see
/// `crates/verify/src/feed.rs`).
async fn prune_history(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    retention: Retention,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut every = tokio::time::interval(PRUNE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = every.tick() => {}
        }
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
}

/// Opens the configured store and brings its schema up to date.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let postgres = PostgresOptions {
        statement_timeout: config.store_timeout,
        listener: config.listener,
    };
    let store = vilvik_keys_store::connect(config.database_url(), &config.sqlite_path, postgres)
        .await
        .with_context(|| match config.database_url() {
            Some(_) => "cannot connect to the Postgres database named by DATABASE_URL".to_owned(),
            None => format!(
                "cannot open the SQLite database {}",
                config.sqlite_path.display()
            ),
        })?;
    let applied = store
        .migrate()
        .await
        .context("cannot apply database migrations")?;
    if applied > 0 {
        tracing::info!(migrations = applied, "applied database migrations");
    }
    Ok(store)
}

/// How a listener's TLS is described in its "listening" line.
fn tls_mode(tls: Option<&Acceptor>) -> &'static str {
    match tls {
        None => "off",
        Some(tls) if tls.demands_client_certificates() => "mutual",
        Some(_) => "on",
    }
}

/// A server builder with what both listeners share: the request deadline,
/// HTTP/2 limits and keepalive pings. The listener's own layers come on
/// top, [`ActivityLayer`] (with one connection's share of the listener's
/// concurrency) first.
fn server(config: &Config) -> Server {
    let limits = &config.listener_limits;
    Server::builder()
        .timeout(config.request_timeout)
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
}

/// Raises the descriptor limit to the hard limit, logs it, and returns the
/// per-listener connection cap that fits it.
fn fit_connection_cap(configured: usize, listeners: usize) -> usize {
    let descriptors = connections::raise_descriptor_limit();
    let cap = connections::fitted_cap(configured, listeners, descriptors);
    tracing::info!(
        open_files.limit = descriptors,
        max_connections = cap,
        "file descriptor limit raised to the hard limit"
    );
    // The default cap is a ceiling, fitted to the machine without a word;
    // a cap an operator chose and the machine cannot hold is worth one.
    let chosen = configured != crate::config::ListenerLimits::default().max_connections;
    if cap < configured && chosen {
        tracing::warn!(
            open_files.limit = descriptors,
            max_connections = cap,
            configured = configured,
            "the file descriptor limit leaves room for fewer connections per listener than max_connections: \
             raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) or lower max_connections"
        );
    }
    cap
}

/// Accepted connections with Nagle's algorithm off: gRPC answers are small
/// and must not wait for an ACK (tonic's `tcp_nodelay` setting applies only
/// when tonic binds the socket itself).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn bind(addr: SocketAddr, listener: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for the {listener} API: is another process using it?")
    })
}

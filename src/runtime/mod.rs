//! What a running service owns, and its orderly stop: [`Runtime`] starts
//! every listener and every background task, tells them all to stop when
//! the process is asked to (SIGINT/SIGTERM, through the `shutdown` future
//! given to [`Runtime::run_until`]), and joins them within the grace
//! period, saying what it had to abandon.
//!
//! The stop, in order:
//! 1. the health service reports NOT_SERVING;
//! 2. every listener stops accepting and every task is told to stop (each
//!    holds a [`Shutdown`], which resolves then); connections that never
//!    sent a request are closed at once, so they do not hold the drain;
//! 3. requests in flight finish until the deadline (`shutdown_grace_ms`
//!    from the signal); any still running then are abandoned and counted;
//! 4. the background tasks are joined until the same deadline, and any
//!    still running then are stopped;
//! 5. the usage writer, which ran until the requests finished so that it
//!    saw every use they noted, makes its final flush, retried until the
//!    deadline and given at least [`MIN_FINAL_FLUSH`]; the keys whose uses
//!    it could not write are abandoned and counted.
//!
//! Anything abandoned is logged in one line (`stopped, abandoning work`,
//! with `requests` and `usage_records`) and returned as [`Abandoned`].

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use vilvik_keys_verify::UsageRecorder;

use crate::config::Config;
use crate::transport::connections::Connections;
use crate::transport::tls::{self, Acceptor};

pub mod listener;
mod shutdown;

pub use listener::{Listener, ListenerSettings, Routes, bind};
pub use shutdown::Shutdown;

/// The final usage flush gets at least this long, even when draining
/// requests used up the grace period.
pub const MIN_FINAL_FLUSH: Duration = Duration::from_millis(500);

/// The listeners and background tasks of a running service, and its stop.
#[derive(Debug)]
pub struct Runtime {
    grace: Duration,
    settings: ListenerSettings,
    tls_reload_interval: Duration,
    health: HealthReporter,
    /// `true` once the process is asked to stop.
    stop: watch::Sender<bool>,
    listeners: JoinSet<Result<(), tonic::transport::Error>>,
    /// Each listener's connections, and its TLS.
    connections: Vec<Connections>,
    acceptors: Vec<Acceptor>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    usage: Option<UsageWriter>,
}

/// The usage write-behind: its task, what stops it once every request has
/// finished, and the recorder the final flush empties.
#[derive(Debug)]
struct UsageWriter {
    task: JoinHandle<()>,
    requests_finished: oneshot::Sender<()>,
    recorder: UsageRecorder,
}

impl Runtime {
    /// An empty runtime with `config`'s grace period and listener settings;
    /// `max_connections` is each listener's connection cap, fitted to the
    /// descriptor limit (`transport::connections::fit_connection_cap`).
    pub fn new(config: &Config, max_connections: usize) -> Self {
        Self {
            grace: config.shutdown_grace,
            settings: ListenerSettings::new(config, max_connections),
            tls_reload_interval: config.tls.reload_interval,
            health: HealthReporter::new(),
            stop: watch::channel(false).0,
            listeners: JoinSet::new(),
            connections: Vec::new(),
            acceptors: Vec::new(),
            tasks: Vec::new(),
            usage: None,
        }
    }

    /// What resolves once the runtime is told to stop.
    pub fn shutdown(&self) -> Shutdown {
        Shutdown::new(self.stop.subscribe())
    }

    /// Starts serving `listener`, its gRPC services reported SERVING; it
    /// stops accepting at the stop and finishes its requests within the
    /// grace period. Its TLS, if any, is reloaded while it serves.
    pub async fn serve(&mut self, listener: Listener) -> anyhow::Result<()> {
        for service in listener.routes.grpc_services() {
            self.health
                .set_service_status(service, ServingStatus::Serving)
                .await;
        }
        self.acceptors.extend(listener.tls.clone());
        let (serving, connections) =
            listener::serve(listener, &self.settings, &self.health, self.shutdown())?;
        self.listeners.spawn(serving);
        self.connections.push(connections);
        Ok(())
    }

    /// Starts a background task, named `name` in log lines: `task` is
    /// given a [`Shutdown`] and must return soon after it resolves; one
    /// still running at the end of the grace period is stopped.
    pub fn spawn<F, T>(&mut self, name: &'static str, task: F)
    where
        F: FnOnce(Shutdown) -> T,
        T: Future<Output = ()> + Send + 'static,
    {
        let task = tokio::spawn(task(self.shutdown()));
        self.tasks.push((name, task));
    }

    /// Starts `usage`'s write-behind: it flushes every interval until
    /// every request has finished, then once more at the stop, and the
    /// uses it cannot write by the deadline are reported as abandoned.
    pub fn spawn_usage_writer(&mut self, usage: UsageRecorder) {
        let (requests_finished, finished) = oneshot::channel::<()>();
        let task = tokio::spawn(usage.clone().run(async move {
            let _ = finished.await;
        }));
        self.usage = Some(UsageWriter {
            task,
            requests_finished,
            recorder: usage,
        });
    }

    /// Serves until `shutdown` resolves (or a listener fails), then stops
    /// as the module's documentation says.
    pub async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let acceptors = std::mem::take(&mut self.acceptors);
        let interval = self.tls_reload_interval;
        self.spawn("TLS reloader", |stop| tls::watch(acceptors, interval, stop));

        // Serve until asked to stop, or until a listener fails.
        let mut failure = None;
        tokio::select! {
            () = shutdown => tracing::info!("shutting down: draining requests"),
            Some(result) = self.listeners.join_next() => {
                failure = Some(result.map_err(anyhow::Error::from).and_then(|r| r.map_err(anyhow::Error::from)));
            }
        }
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.stop.send_replace(true);
        // Connections that never sent a request get no GOAWAY to wait for.
        for connections in &self.connections {
            connections.close_unused();
        }
        // The grace period covers draining requests and the final flush.
        let deadline = Instant::now() + self.grace;
        let abandoned = Abandoned {
            requests: self.drain(deadline).await,
            usage_records: 0,
        };
        self.join_tasks(deadline).await;
        let abandoned = Abandoned {
            usage_records: self.flush_usage(deadline).await?,
            ..abandoned
        };
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

    /// Waits until every listener has finished its requests, or until
    /// `deadline`; then stops them. How many requests were still running.
    async fn drain(&mut self, deadline: Instant) -> usize {
        let listeners = &mut self.listeners;
        let drained = tokio::time::timeout_at(deadline, async {
            while listeners.join_next().await.is_some() {}
        })
        .await;
        if drained.is_ok() {
            return 0;
        }
        let requests = self
            .connections
            .iter()
            .map(Connections::requests_in_flight)
            .sum();
        tracing::warn!(
            grace_ms = self.grace.as_millis() as u64,
            requests,
            "requests still running after the grace period; stopping anyway"
        );
        self.listeners.abort_all();
        requests
    }

    /// Joins the background tasks (told to stop already) until
    /// `deadline`, and stops those still running then.
    async fn join_tasks(&mut self, deadline: Instant) {
        let mut still_running = Vec::new();
        for (name, mut task) in self.tasks.drain(..) {
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(task = name, error = %e, "background task failed"),
                Err(_) => {
                    task.abort();
                    still_running.push(name);
                }
            }
        }
        if !still_running.is_empty() {
            tracing::warn!(
                tasks = ?still_running,
                "background tasks still running after the grace period; stopped them"
            );
        }
    }

    /// Every request has finished: stops the usage writer and flushes what
    /// they noted, retrying until `deadline` (at least one try, however
    /// late). How many keys' uses it could not write.
    async fn flush_usage(&mut self, deadline: Instant) -> anyhow::Result<usize> {
        let Some(usage) = self.usage.take() else {
            return Ok(0);
        };
        let _ = usage.requests_finished.send(());
        usage.task.await.context("usage flusher panicked")?;
        let last_try = Instant::now() + MIN_FINAL_FLUSH;
        Ok(usage.recorder.flush_before(deadline.max(last_try)).await)
    }
}

/// Runs `work` at once and then every `period` until `stop` resolves. A
/// late run delays the next rather than bunching them up; a run in
/// progress when `stop` resolves finishes first.
pub async fn every<W, F>(period: Duration, stop: impl Future<Output = ()>, mut work: W)
where
    W: FnMut() -> F,
    F: Future<Output = ()>,
{
    tokio::pin!(stop);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticks.tick() => {}
        }
        work().await;
    }
}

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

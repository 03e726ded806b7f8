//! One in-process node: `Application::build_with_clock` on the ports its
//! configuration names (port 0: free ones), run on a task of the test's
//! runtime until it is stopped or dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use vilvik_keys::config::{Config, LogFormat};
use vilvik_keys::startup::{Application, Role};
use vilvik_keys_domain::Clock;

/// A running node, stopped when dropped (at once, as a crash would be;
/// [`Server::stop`] stops it gracefully).
#[derive(Debug)]
pub struct Server {
    admin_addr: Option<SocketAddr>,
    verify_addr: Option<SocketAddr>,
    running: Option<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
}

impl Server {
    /// Builds `role` on `config` and `clock` and starts serving; the
    /// build's error when it does not start.
    pub async fn start(config: Config, role: Role, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        init_logging();
        let app = Application::build_with_clock(config, role, clock).await?;
        let (admin_addr, verify_addr) = (app.admin_addr(), app.verify_addr());
        let (stop, stopped) = oneshot::channel();
        let handle = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            admin_addr,
            verify_addr,
            running: Some((stop, handle)),
        })
    }

    /// The admin listener's address; panics when the role has none.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr.expect("this node serves the admin API")
    }

    /// The verify listener's address; panics when the role has none.
    pub fn verify_addr(&self) -> SocketAddr {
        self.verify_addr.expect("this node serves the verify API")
    }

    /// Stops serving as on SIGTERM and waits until it has; panics unless it
    /// shut down cleanly. Does nothing when already stopped.
    pub async fn stop(&mut self) {
        if let Some((stop, handle)) = self.running.take() {
            let _ = stop.send(());
            handle
                .await
                .expect("the server task does not panic")
                .expect("the server shuts down cleanly");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.running.take() {
            let _ = stop.send(());
            handle.abort();
        }
    }
}

/// A connected channel to `addr`; panics when nothing accepts there.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("the test server at {addr} accepts connections: {e}"))
}

/// A channel to `addr` that connects on first use and again after the
/// server restarts, each connect bounded by a second and each call by
/// `timeout` when given.
pub fn lazy_channel(addr: SocketAddr, timeout: Option<Duration>) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect_timeout(Duration::from_secs(1));
    match timeout {
        Some(timeout) => endpoint.timeout(timeout),
        None => endpoint,
    }
    .connect_lazy()
}

/// Runs `call` (a call through a tonic client, say) until it has to wait,
/// then on a task of its own: its request is on its way, so that a call
/// made afterwards on the same channel reaches the server after it.
pub async fn sent_first<F>(call: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut call = Box::pin(call);
    match std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await {
        Poll::Ready(output) => tokio::spawn(async move { output }),
        Poll::Pending => tokio::spawn(call),
    }
}

/// Creates a management key named `bootstrap` for `account` on the store
/// `config` names, as `vilvik-keys bootstrap` does (migrating the store and
/// making the default pepper when needed); returns its key id and secret.
pub async fn bootstrap_account(config: &Config, account: &str) -> (String, String) {
    let store = vilvik_keys::startup::open_store(config)
        .await
        .expect("the test's store opens and migrates");
    let peppers = vilvik_keys::pepper::load(config, store.as_ref())
        .await
        .expect("the test's pepper loads");
    let (record, secret) = vilvik_keys::cli::create_management_key(
        &store,
        peppers.current(),
        &account.parse().expect("a valid account id"),
        "bootstrap".parse().expect("a valid key name"),
        &config.policy(),
    )
    .await
    .expect("the management key is created");
    (record.key_id.to_string(), secret.expose_secret().to_owned())
}

static LOGGING: std::sync::Once = std::sync::Once::new();

/// In-process servers log only when `TEST_LOG` is set.
pub fn init_logging() {
    LOGGING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            vilvik_keys::telemetry::init(LogFormat::Pretty);
        }
    });
}

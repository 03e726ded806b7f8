//! The test harness: a real server on free ports, on a fresh SQLite file or
//! a fresh Postgres database, driven through the generated clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use vilvik_keys::config::Config;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys::proto::{self, VerifyCode};
use vilvik_keys::startup::{Application, Role};
use vilvik_keys_domain::{ManualClock, TierLimits};
use vilvik_keys_test_db::TestDatabase;

pub const ACCOUNT: &str = "ACME";
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789abcdef";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Keeps the backing database, and the directory of its SQLite file or its
/// pepper files, alive for the test's duration.
struct Database {
    _dir: tempfile::TempDir,
    _postgres: Option<TestDatabase>,
}

pub struct TestApp {
    pub admin_addr: SocketAddr,
    pub verify_addr: SocketAddr,
    pub admin: KeyAdminClient<Channel>,
    pub verify: KeyVerifyClient<Channel>,
    /// The account's bootstrapped management key.
    pub management_key: String,
    pub management_key_id: String,
    pub clock: Arc<ManualClock>,
    pub config: Config,
    pub backend: Backend,
    /// The test's own directory: the SQLite file and its pepper file, or
    /// (on Postgres) the pepper file; room for more.
    pub dir: std::path::PathBuf,
    server: Option<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
    _database: Database,
}

/// Starts a server on `backend` and bootstraps account ACME. `None` when
/// the backend is Postgres and no test database is configured (skipped).
pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |_| {}).await
}

pub async fn spawn_app_with(
    backend: Backend,
    configure: impl FnOnce(&mut Config),
) -> Option<TestApp> {
    init_logging();
    let mut config = Config {
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        verify_addr: "127.0.0.1:0".parse().unwrap(),
        operator_token: Some(SecretString::from(OPERATOR_TOKEN)),
        usage_flush_interval: Duration::from_millis(100),
        // A lost change feed is followed again at once, not after 500 ms.
        change_feed_retry_interval: Duration::from_millis(20),
        tier_limits: TierLimits::default(),
        ..Config::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let database = match backend {
        // The pepper is the default one, generated beside the database.
        Backend::Sqlite => {
            config.sqlite_path = dir.path().join("keys.db");
            Database {
                _dir: dir,
                _postgres: None,
            }
        }
        // Every node of a test shares one pepper file, as in production
        // (the default would be in the working directory).
        Backend::Postgres => {
            let db = TestDatabase::create().await?;
            config.database_url = Some(SecretString::from(db.url().to_owned()));
            let pepper_file = dir.path().join("current.pepper");
            vilvik_keys::pepper::create(&pepper_file).unwrap();
            config.pepper_file = Some(pepper_file);
            Database {
                _dir: dir,
                _postgres: Some(db),
            }
        }
    };
    let dir = database._dir.path().to_owned();
    configure(&mut config);
    // Whole seconds, so times round-trip exactly through both stores.
    let start = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let clock = Arc::new(ManualClock::new(start));

    let store = vilvik_keys::startup::open_store(&config).await.unwrap();
    let peppers = vilvik_keys::pepper::load(&config, store.as_ref())
        .await
        .unwrap();
    let (record, secret) = vilvik_keys::cli::create_management_key(
        &store,
        peppers.current(),
        &ACCOUNT.parse().unwrap(),
        "bootstrap".parse().unwrap(),
        &config.policy(),
    )
    .await
    .unwrap();
    drop(store);

    let mut app = TestApp {
        admin_addr: config.admin_addr,
        verify_addr: config.verify_addr,
        admin: KeyAdminClient::new(Channel::from_static("http://127.0.0.1:1").connect_lazy()),
        verify: KeyVerifyClient::new(Channel::from_static("http://127.0.0.1:1").connect_lazy()),
        management_key: secret.expose_secret().to_owned(),
        management_key_id: record.key_id.to_string(),
        clock,
        config,
        backend,
        dir,
        server: None,
        _database: database,
    };
    app.start().await;
    Some(app)
}

static LOGGING: std::sync::Once = std::sync::Once::new();

/// Quiet unless `TEST_LOG` is set.
fn init_logging() {
    LOGGING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            vilvik_keys::telemetry::init(vilvik_keys::config::LogFormat::Pretty);
        }
    });
}

impl TestApp {
    async fn start(&mut self) {
        let app = Application::build_with_clock(self.config.clone(), Role::All, self.clock.clone())
            .await
            .expect("the server starts");
        self.admin_addr = app.admin_addr().unwrap();
        self.verify_addr = app.verify_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let handle = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        self.server = Some((stop, handle));
        if self.config.tls.enabled() {
            // TLS tests make their own clients, with the certificates they need.
            return;
        }
        self.admin = KeyAdminClient::new(channel(self.admin_addr).await);
        self.verify = KeyVerifyClient::new(channel(self.verify_addr).await);
    }

    /// Stops the server gracefully (as on SIGTERM) and waits until it has.
    pub async fn stop(&mut self) {
        if let Some((stop, handle)) = self.server.take() {
            let _ = stop.send(());
            handle
                .await
                .unwrap()
                .expect("the server shuts down cleanly");
        }
    }

    /// Stops and starts the server again on the same store, on new ports.
    pub async fn restart(&mut self) {
        self.stop().await;
        // The old ports may linger; take fresh ones.
        self.config.admin_addr = "127.0.0.1:0".parse().unwrap();
        self.config.verify_addr = "127.0.0.1:0".parse().unwrap();
        self.start().await;
    }

    /// A request carrying this account's management key.
    pub fn authed<T>(&self, message: T) -> Request<T> {
        with_bearer(message, &self.management_key)
    }

    /// A request made with the operator token on behalf of `actor`.
    pub fn as_operator<T>(&self, message: T, account: &str, actor: &str) -> Request<T> {
        let mut request = with_bearer(message, OPERATOR_TOKEN);
        request
            .metadata_mut()
            .insert("x-vilvik-account", account.parse().unwrap());
        request
            .metadata_mut()
            .insert("x-vilvik-actor", actor.parse().unwrap());
        request
    }

    pub async fn create_key(
        &mut self,
        name: &str,
        scopes: &[&str],
    ) -> Result<proto::CreateKeyResponse, Status> {
        let request = self.authed(proto::CreateKeyRequest {
            name: name.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        self.admin.create_key(request).await.map(|r| r.into_inner())
    }

    pub async fn verify_key(&mut self, key: &str, required: &[&str]) -> proto::VerifyKeyResponse {
        self.verify
            .verify_key(proto::VerifyKeyRequest {
                key: key.into(),
                required_scopes: required.iter().map(|s| s.to_string()).collect(),
                client_ip: String::new(),
            })
            .await
            .expect("VerifyKey answers OK")
            .into_inner()
    }

    pub async fn verify_code(&mut self, key: &str, required: &[&str]) -> VerifyCode {
        self.verify_key(key, required).await.code()
    }

    pub async fn get_key(&mut self, key_id: &str) -> proto::Key {
        let request = self.authed(proto::GetKeyRequest {
            key_id: key_id.into(),
        });
        self.admin
            .get_key(request)
            .await
            .expect("GetKey")
            .into_inner()
    }

    pub async fn list_keys(&mut self, include_revoked: bool) -> Vec<proto::Key> {
        let request = self.authed(proto::ListKeysRequest {
            include_revoked,
            page_size: 100,
            ..Default::default()
        });
        self.admin
            .list_keys(request)
            .await
            .expect("ListKeys")
            .into_inner()
            .keys
    }

    pub async fn audit(&mut self, key_id: &str) -> Vec<proto::AuditEvent> {
        let request = self.authed(proto::ListAuditEventsRequest {
            key_id: key_id.into(),
            page_size: 100,
            ..Default::default()
        });
        self.admin
            .list_audit_events(request)
            .await
            .expect("ListAuditEvents")
            .into_inner()
            .events
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.server.take() {
            let _ = stop.send(());
            handle.abort();
        }
    }
}

pub fn with_bearer<T>(message: T, credential: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().unwrap(),
    );
    request
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("the test server accepts connections")
}

/// Asserts the call failed with `code` and a message containing `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    needle: &str,
) -> Status {
    let status = result.expect_err("the call should have failed");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} should mention {needle:?}",
        status.message()
    );
    status
}

/// A protobuf timestamp `days` from the app's clock.
pub fn days_from(now: OffsetDateTime, days: i64) -> prost_types::Timestamp {
    let at = now + time::Duration::days(days);
    prost_types::Timestamp {
        seconds: at.unix_timestamp(),
        nanos: 0,
    }
}

/// Keys without their last-use fields, which every admin call through a
/// management key updates in the background; for before/after comparisons.
pub fn without_usage(mut keys: Vec<proto::Key>) -> Vec<proto::Key> {
    for key in &mut keys {
        key.last_used_at = None;
        key.last_used_ip.clear();
    }
    keys
}

/// Another `serve --role verify` process on the same database.
pub struct VerifyNode {
    pub addr: SocketAddr,
    pub verify: KeyVerifyClient<Channel>,
    server: Option<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
}

impl TestApp {
    /// Starts a verify-only node sharing this app's store and clock.
    pub async fn spawn_verify_node(&self, configure: impl FnOnce(&mut Config)) -> VerifyNode {
        let mut config = self.config.clone();
        config.verify_addr = "127.0.0.1:0".parse().unwrap();
        configure(&mut config);
        let app = Application::build_with_clock(config, Role::Verify, self.clock.clone())
            .await
            .expect("the verify node starts");
        let addr = app.verify_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let handle = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        VerifyNode {
            addr,
            verify: KeyVerifyClient::new(channel(addr).await),
            server: Some((stop, handle)),
        }
    }
}

impl VerifyNode {
    pub async fn verify_code(&mut self, key: &str) -> VerifyCode {
        self.verify
            .verify_key(proto::VerifyKeyRequest {
                key: key.into(),
                ..Default::default()
            })
            .await
            .expect("VerifyKey answers OK")
            .into_inner()
            .code()
    }

    /// Waits until this node knows a key created on another node: it
    /// learns new prefixes from the change feed (a millisecond or so on
    /// Postgres, one poll on SQLite) and until then answers NOT_FOUND.
    pub async fn wait_until_known(&mut self, key: &str) -> VerifyCode {
        let what = format!("node {} knows the new key", self.addr);
        vilvik_keys_test_db::eventually(Duration::from_secs(2), &what, || {
            let mut client = self.verify.clone();
            let key = key.to_owned();
            async move {
                let answer = client
                    .verify_key(proto::VerifyKeyRequest {
                        key,
                        ..Default::default()
                    })
                    .await
                    .expect("VerifyKey answers OK");
                answer.into_inner().code() != VerifyCode::NotFound
            }
        })
        .await;
        self.verify_code(key).await
    }
}

impl Drop for VerifyNode {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.server.take() {
            let _ = stop.send(());
            handle.abort();
        }
    }
}

impl TestApp {
    /// A direct connection to the app's Postgres database, for inspecting
    /// it the way an operator would.
    pub async fn postgres_client(&self) -> tokio_postgres::Client {
        use secrecy::ExposeSecret;
        let url = self
            .config
            .database_url
            .as_ref()
            .expect("a Postgres app")
            .expose_secret();
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }
}

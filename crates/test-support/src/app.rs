//! [`TestApp`]: the whole service in process, on a store of the test's
//! own, with the generated clients connected.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use time::OffsetDateTime;
use tonic::transport::Channel;
use tonic::{Request, Status};
use vilvik_keys::config::Config;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys::proto::{self, VerifyCode};
use vilvik_keys::startup::Role;
use vilvik_keys_domain::{ManualClock, TierLimits};
use vilvik_keys_test_db::{TestDatabase, eventually};

use crate::postgres::postgres_client;
use crate::requests::{self, as_operator, bearer};
use crate::server::{Server, bootstrap_account, channel};
use crate::{ACCOUNT, OPERATOR_TOKEN};

/// The store a [`TestApp`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A fresh SQLite file in the test's directory, its pepper the default
    /// one generated beside it.
    Sqlite,
    /// A fresh database on the server `VILVIK_KEYS_TEST_DATABASE_URL`
    /// names, dropped afterwards, with a pepper file in the test's
    /// directory that every node of the test shares.
    Postgres,
}

/// The service on free ports, on `backend`, with account [`ACCOUNT`]
/// bootstrapped. `None` when the backend is Postgres and no test database
/// is configured (the test is skipped).
pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |_| {}).await
}

/// [`spawn_app`] with the configuration changed by `configure` first.
pub async fn spawn_app_with(
    backend: Backend,
    configure: impl FnOnce(&mut Config),
) -> Option<TestApp> {
    TestApp::spawn(backend, configure, Some(ACCOUNT)).await
}

/// The whole service (`serve --role all`) in process, and what a test needs
/// to drive it. Stopped when dropped; its store and directory are removed.
#[derive(Debug)]
pub struct TestApp {
    pub admin_addr: SocketAddr,
    pub verify_addr: SocketAddr,
    /// Connected to the admin listener (not with TLS: TLS tests make their
    /// own clients, with the certificates they need).
    pub admin: KeyAdminClient<Channel>,
    /// Connected to the verify listener (not with TLS).
    pub verify: KeyVerifyClient<Channel>,
    /// The bootstrapped account's management key (empty with
    /// [`TestApp::spawn_empty`]).
    pub management_key: String,
    pub management_key_id: String,
    /// The service's clock: whole seconds at the start, moving only when
    /// the test advances it.
    pub clock: Arc<ManualClock>,
    /// The configuration the service runs with; [`TestApp::restart`]
    /// applies changes made to it.
    pub config: Config,
    pub backend: Backend,
    /// The test's own directory: the SQLite file and its pepper, or (on
    /// Postgres) the pepper file; room for more.
    pub dir: PathBuf,
    server: Option<Server>,
    _dir: tempfile::TempDir,
    _database: Option<TestDatabase>,
}

impl TestApp {
    /// The service on `backend` with nothing in its store: for tests that
    /// bootstrap accounts themselves (through the binary, say).
    pub async fn spawn_empty(
        backend: Backend,
        configure: impl FnOnce(&mut Config),
    ) -> Option<TestApp> {
        Self::spawn(backend, configure, None).await
    }

    async fn spawn(
        backend: Backend,
        configure: impl FnOnce(&mut Config),
        account: Option<&str>,
    ) -> Option<TestApp> {
        let mut config = Config {
            admin_addr: "127.0.0.1:0".parse().expect("an address"),
            verify_addr: "127.0.0.1:0".parse().expect("an address"),
            operator_token: Some(SecretString::from(OPERATOR_TOKEN)),
            usage_flush_interval: Duration::from_millis(100),
            // A lost change feed is followed again at once, not after 500 ms.
            change_feed_retry_interval: Duration::from_millis(20),
            tier_limits: TierLimits::default(),
            ..Config::default()
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let database = match backend {
            Backend::Sqlite => {
                config.sqlite_path = dir.path().join("keys.db");
                None
            }
            Backend::Postgres => {
                let database = TestDatabase::create().await?;
                config.database_url = Some(SecretString::from(database.url().to_owned()));
                let pepper_file = dir.path().join("current.pepper");
                vilvik_keys::pepper::create(&pepper_file).expect("a pepper file");
                config.pepper_file = Some(pepper_file);
                Some(database)
            }
        };
        configure(&mut config);
        let (management_key_id, management_key) = match account {
            Some(account) => bootstrap_account(&config, account).await,
            None => Default::default(),
        };
        // Whole seconds, so times round-trip exactly through both stores.
        let start = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("a valid time");
        let unconnected = || Channel::from_static("http://127.0.0.1:1").connect_lazy();
        let mut app = TestApp {
            admin_addr: config.admin_addr,
            verify_addr: config.verify_addr,
            admin: KeyAdminClient::new(unconnected()),
            verify: KeyVerifyClient::new(unconnected()),
            management_key,
            management_key_id,
            clock: Arc::new(ManualClock::new(start)),
            config,
            backend,
            dir: dir.path().to_owned(),
            server: None,
            _dir: dir,
            _database: database,
        };
        app.start().await;
        Some(app)
    }

    async fn start(&mut self) {
        let server = Server::start(self.config.clone(), Role::All, self.clock.clone())
            .await
            .expect("the server starts");
        self.admin_addr = server.admin_addr();
        self.verify_addr = server.verify_addr();
        self.server = Some(server);
        if !self.config.tls.enabled() {
            self.admin = KeyAdminClient::new(channel(self.admin_addr).await);
            self.verify = KeyVerifyClient::new(channel(self.verify_addr).await);
        }
    }

    /// Stops the service gracefully (as on SIGTERM) and waits until it has;
    /// panics unless it shut down cleanly.
    pub async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.stop().await;
        }
    }

    /// Stops the service and starts it again on the same store with
    /// [`TestApp::config`], on new ports.
    pub async fn restart(&mut self) {
        self.stop().await;
        // The old ports may linger; take fresh ones.
        self.config.admin_addr = "127.0.0.1:0".parse().expect("an address");
        self.config.verify_addr = "127.0.0.1:0".parse().expect("an address");
        self.start().await;
    }

    /// A request carrying the account's management key.
    pub fn authed<T>(&self, message: T) -> Request<T> {
        bearer(message, &self.management_key)
    }

    /// A request made with the operator token for `account` on behalf of
    /// `actor`.
    pub fn as_operator<T>(&self, message: T, account: &str, actor: &str) -> Request<T> {
        as_operator(message, OPERATOR_TOKEN, account, actor)
    }

    /// CreateKey with the management key.
    pub async fn create_key(
        &mut self,
        name: &str,
        scopes: &[&str],
    ) -> Result<proto::CreateKeyResponse, Status> {
        let request = self.authed(requests::create(name, scopes));
        self.admin.create_key(request).await.map(|r| r.into_inner())
    }

    /// CreateKey by the operator in `account`, acting as `alice@example.com`;
    /// panics unless it succeeds.
    pub async fn create_key_as_operator(
        &mut self,
        account: &str,
        name: &str,
        scopes: &[&str],
    ) -> proto::CreateKeyResponse {
        let request =
            self.as_operator(requests::create(name, scopes), account, "alice@example.com");
        self.admin
            .create_key(request)
            .await
            .expect("the operator's CreateKey")
            .into_inner()
    }

    /// RotateKey with the management key.
    pub async fn rotate_key(&mut self, key_id: &str) -> Result<proto::RotateKeyResponse, Status> {
        let request = self.authed(requests::rotate(key_id));
        self.admin.rotate_key(request).await.map(|r| r.into_inner())
    }

    /// RevokeKey with the management key, giving no reason.
    pub async fn revoke_key(&mut self, key_id: &str) -> Result<proto::Key, Status> {
        let request = self.authed(requests::revoke(key_id));
        self.admin.revoke_key(request).await.map(|r| r.into_inner())
    }

    /// VerifyKey of `key` requiring `required`; panics unless answered OK.
    pub async fn verify_key(&mut self, key: &str, required: &[&str]) -> proto::VerifyKeyResponse {
        self.verify
            .verify_key(requests::verify(key, required))
            .await
            .expect("VerifyKey answers OK")
            .into_inner()
    }

    pub async fn verify_code(&mut self, key: &str, required: &[&str]) -> VerifyCode {
        self.verify_key(key, required).await.code()
    }

    /// GetKey with the management key; panics unless answered OK.
    pub async fn get_key(&mut self, key_id: &str) -> proto::Key {
        let request = self.authed(requests::get(key_id));
        self.admin
            .get_key(request)
            .await
            .expect("GetKey")
            .into_inner()
    }

    /// The first 100 of the account's keys.
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

    /// The first 100 audit events of `key_id` (of the whole account when
    /// empty).
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

    /// Waits (up to `within`) until GetKey of `key_id` satisfies `done`:
    /// for what the service writes behind (a key's last use, say).
    pub async fn wait_for_key(
        &self,
        key_id: &str,
        within: Duration,
        what: &str,
        done: impl Fn(&proto::Key) -> bool,
    ) {
        let done = &done;
        eventually(within, what, || {
            let mut admin = self.admin.clone();
            let request = self.authed(requests::get(key_id));
            async move {
                let key = admin.get_key(request).await.expect("GetKey").into_inner();
                done(&key)
            }
        })
        .await;
    }

    /// GetAccount with the management key; panics unless answered OK.
    pub async fn account(&mut self) -> proto::Account {
        let request = self.authed(proto::GetAccountRequest {});
        self.admin
            .get_account(request)
            .await
            .expect("GetAccount")
            .into_inner()
    }

    /// A session on the app's Postgres database, for inspecting it the way
    /// an operator would; panics on SQLite.
    pub async fn postgres_client(&self) -> tokio_postgres::Client {
        use secrecy::ExposeSecret;
        let url = self
            .config
            .database_url
            .as_ref()
            .expect("a Postgres app")
            .expose_secret();
        postgres_client(url).await
    }

    /// Starts a verify-only node (`serve --role verify`) sharing this app's
    /// store, pepper and clock, on a free port; `configure` changes its
    /// configuration first.
    pub async fn spawn_verify_node(&self, configure: impl FnOnce(&mut Config)) -> VerifyNode {
        let mut config = self.config.clone();
        config.verify_addr = "127.0.0.1:0".parse().expect("an address");
        configure(&mut config);
        let server = Server::start(config, Role::Verify, self.clock.clone())
            .await
            .expect("the verify node starts");
        let addr = server.verify_addr();
        VerifyNode {
            addr,
            verify: KeyVerifyClient::new(channel(addr).await),
            _server: server,
        }
    }
}

/// A verify-only node of a [`TestApp`], stopped when dropped.
#[derive(Debug)]
pub struct VerifyNode {
    pub addr: SocketAddr,
    pub verify: KeyVerifyClient<Channel>,
    _server: Server,
}

impl VerifyNode {
    /// VerifyKey of `key` with no scopes; panics unless answered OK.
    pub async fn verify_code(&mut self, key: &str) -> VerifyCode {
        verify_code(self.verify.clone(), key).await
    }

    /// Waits until this node knows a key created on another node: it
    /// learns new prefixes from the change feed (a millisecond or so on
    /// Postgres, one poll on SQLite) and until then answers NOT_FOUND.
    pub async fn wait_until_known(&mut self, key: &str) -> VerifyCode {
        let what = format!("node {} knows the new key", self.addr);
        self.wait_for_code(key, Duration::from_secs(2), &what, |code| {
            code != VerifyCode::NotFound
        })
        .await;
        self.verify_code(key).await
    }

    /// Waits (up to `within`) until this node's answer for `key`
    /// satisfies `done`; `done` may panic on an answer that must never come.
    pub async fn wait_for_code(
        &self,
        key: &str,
        within: Duration,
        what: &str,
        done: impl Fn(VerifyCode) -> bool,
    ) {
        let done = &done;
        eventually(within, what, || {
            let client = self.verify.clone();
            async move { done(verify_code(client, key).await) }
        })
        .await;
    }
}

async fn verify_code(mut client: KeyVerifyClient<Channel>, key: &str) -> VerifyCode {
    client
        .verify_key(requests::verify(key, &[]))
        .await
        .expect("VerifyKey answers OK")
        .into_inner()
        .code()
}

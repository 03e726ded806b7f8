//! One admin node and two verify nodes on a Postgres cluster of the test's
//! own: `direct` reaches it straight, `cut_off` through a [`FaultProxy`]
//! the test can turn into a black hole or a reset. Every node uses the
//! system clock (the staleness bound is measured in real time) and small
//! intervals, so a fault plays out in seconds. Probes record what each
//! node answered and when, relative to the moment the fault began.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio::sync::{Mutex, MutexGuard};
use tonic::Code;
use tonic::transport::Channel;
use vilvik_keys::config::Config;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys::proto::{self, VerifyCode};
use vilvik_keys::startup::Role;
use vilvik_keys_domain::SystemClock;
use vilvik_keys_test_db::{FaultProxy, PrivateCluster};
use vilvik_keys_test_support::requests::{create, revoke, verify};
use vilvik_keys_test_support::{
    OPERATOR_TOKEN, Server, bearer, bootstrap_account, channel, eventually,
};

/// How long a node trusts its cache without a confirmed read of the
/// change log (`VILVIK_KEYS_STALENESS_BOUND_MS`).
pub const STALENESS_BOUND: Duration = Duration::from_secs(3);
/// How often a node compares its position in the change log with the
/// store's (`VILVIK_KEYS_CONSISTENCY_CHECK_MS`).
pub const CONSISTENCY_CHECK: Duration = Duration::from_millis(200);
/// The deadline of every store call (`VILVIK_KEYS_STORE_TIMEOUT_MS`):
/// "one deadline" in the assertions.
pub const STORE_DEADLINE: Duration = Duration::from_secs(2);
/// How often a node whose listener is down reads the change log through
/// its pool (`VILVIK_KEYS_CHANGE_FALLBACK_POLL_MS`).
pub const FALLBACK_POLL: Duration = Duration::from_millis(200);
/// The longest a cut-off node may go on accepting what it cached, counted
/// from the moment the fault began: the bound, plus one store call that
/// started just before the fault and waited out its deadline.
pub const ACCEPT_AT_MOST: Duration = STALENESS_BOUND.saturating_add(STORE_DEADLINE);
/// How often each probe asks its node.
pub const PROBE_EVERY: Duration = Duration::from_millis(25);
/// A probe that gets no answer within this long records `Silent`; every
/// node's own request timeout is shorter.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

const DATABASE: &str = "vilvik";
const ACCOUNT: &str = "ACME";

/// One fault test at a time: each times what it sees in wall-clock
/// milliseconds, on a machine that may have two cores.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// The nodes, the proxy and the cluster of one test. Dropped in that order:
/// the nodes stop before the database they use goes away.
pub struct Faults {
    pub admin: Node,
    pub direct: Node,
    pub cut_off: Node,
    pub proxy: FaultProxy,
    pub cluster: PrivateCluster,
    management_key: String,
    /// The nodes' one pepper file.
    _pepper_dir: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

/// A key made for a scenario.
#[derive(Debug, Clone)]
pub struct TestKey {
    pub key_id: String,
    pub secret: String,
}

impl Faults {
    /// Starts the cluster, creates the database, bootstraps account ACME,
    /// starts the admin node, creates a key for each of `keys` through it,
    /// and then starts the two verify nodes with `--preload`, so each holds
    /// every key in memory, and checks each answers VALID for them.
    /// `None` when no Postgres server is installed and none is required
    /// (skipped).
    ///
    /// Preloaded, not cached by a first verify: a node that loads a new
    /// key before the creation's own notification reaches it evicts the
    /// entry again when it does, and the scenario would test no cache.
    pub async fn start(keys: &[&str]) -> Option<(Faults, Vec<TestKey>)> {
        let serial = SERIAL.lock().await;
        let cluster = PrivateCluster::start()?;
        let url = cluster.create_database(DATABASE).await;
        let target: SocketAddr = ([127, 0, 0, 1], cluster.port()).into();
        let proxy = FaultProxy::start(target).await;
        let proxied_url = format!("postgres://postgres@{}/{DATABASE}", proxy.addr());

        let pepper_dir = tempfile::tempdir().unwrap();
        let pepper_file = pepper_dir.path().join("pepper");
        vilvik_keys::pepper::create(&pepper_file).unwrap();
        let config = |url: &str| Config {
            pepper_file: Some(pepper_file.clone()),
            ..config(url)
        };
        let admin_config = config(&url);
        let (_, management_key) = bootstrap_account(&admin_config, ACCOUNT).await;

        let admin = Node::start("admin", admin_config, Role::Admin).await;
        let mut created = Vec::with_capacity(keys.len());
        for name in keys {
            created.push(create_key(&admin, &management_key, name).await);
        }
        let verify_config = |url: &str| Config {
            preload: true,
            ..config(url)
        };
        let direct = Node::start("direct", verify_config(&url), Role::Verify).await;
        let cut_off = Node::start("cut-off", verify_config(&proxied_url), Role::Verify).await;
        // Every node follows the change log before the fault: it does right
        // after its listener has subscribed.
        let superuser = cluster.client("postgres").await;
        eventually(
            Duration::from_secs(10),
            "the three nodes' change listeners are subscribed",
            || async {
                let listening = superuser
                    .query(
                        "SELECT 1 FROM pg_stat_activity WHERE datname = $1 \
                         AND application_name = 'vilvik-keys-listener' AND state = 'idle'",
                        &[&DATABASE],
                    )
                    .await
                    .unwrap();
                listening.len() >= 3
            },
        )
        .await;
        for node in [&direct, &cut_off] {
            for key in &created {
                assert_eq!(
                    probe(&mut node.verify(), &key.secret).await,
                    Answer::Valid,
                    "{} answers VALID for a preloaded key",
                    node.name
                );
            }
        }
        let faults = Faults {
            admin,
            direct,
            cut_off,
            proxy,
            cluster,
            management_key,
            _pepper_dir: pepper_dir,
            _serial: serial,
        };
        Some((faults, created))
    }

    /// Revokes `key` through the admin node; returns once it is
    /// acknowledged.
    pub async fn revoke(&self, key: &TestKey) {
        let request = proto::RevokeKeyRequest {
            reason: "fault test".into(),
            ..revoke(&key.key_id)
        };
        self.admin
            .admin()
            .revoke_key(bearer(request, &self.management_key))
            .await
            .expect("the admin node revokes the key");
    }

    /// A superuser session on the cluster's `postgres` database, which
    /// stays reachable when the service's database refuses connections.
    pub async fn superuser(&self) -> tokio_postgres::Client {
        self.cluster.client("postgres").await
    }

    /// The service's database, for `ALTER DATABASE`.
    pub fn database(&self) -> &'static str {
        DATABASE
    }
}

/// Creates a key named `name` through the admin node.
async fn create_key(admin: &Node, management_key: &str, name: &str) -> TestKey {
    let created = admin
        .admin()
        .create_key(bearer(create(name, &["datasets:read"]), management_key))
        .await
        .expect("CreateKey")
        .into_inner();
    TestKey {
        key_id: created.key.expect("the created key").key_id,
        secret: created.secret,
    }
}

/// The settings every node of a fault test runs with, on `url`.
fn config(url: &str) -> Config {
    let mut config = Config {
        database_url: Some(SecretString::from(url.to_owned())),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        verify_addr: "127.0.0.1:0".parse().unwrap(),
        operator_token: Some(SecretString::from(OPERATOR_TOKEN)),
        staleness_bound: STALENESS_BOUND,
        consistency_check_interval: CONSISTENCY_CHECK,
        store_timeout: STORE_DEADLINE,
        change_fallback_poll: FALLBACK_POLL,
        change_feed_retry_interval: Duration::from_millis(50),
        usage_flush_interval: Duration::from_millis(200),
        ..Config::default()
    };
    // A silent listener is noticed within half a second.
    config.listener.heartbeat = Duration::from_millis(200);
    config.listener.heartbeat_timeout = Duration::from_millis(300);
    config
}

/// One in-process node (`serve --role ...`) on the system clock, stopped
/// when dropped.
pub struct Node {
    pub name: &'static str,
    channel: Channel,
    _server: Server,
}

impl Node {
    async fn start(name: &'static str, config: Config, role: Role) -> Node {
        let server = Server::start(config, role, Arc::new(SystemClock))
            .await
            .unwrap_or_else(|e| panic!("the {name} node starts: {e:#}"));
        let addr = match role {
            Role::Admin => server.admin_addr(),
            Role::Verify | Role::All => server.verify_addr(),
        };
        Node {
            name,
            channel: channel(addr).await,
            _server: server,
        }
    }

    pub fn verify(&self) -> KeyVerifyClient<Channel> {
        KeyVerifyClient::new(self.channel.clone())
    }

    fn admin(&self) -> KeyAdminClient<Channel> {
        KeyAdminClient::new(self.channel.clone())
    }
}

/// What a node said about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Valid,
    Revoked,
    /// Another verify code.
    Code(VerifyCode),
    /// UNAVAILABLE: the node would not answer from memory and could not
    /// read the store.
    Unavailable,
    /// Another gRPC status.
    Status(Code),
    /// Nothing within [`PROBE_TIMEOUT`].
    Silent,
}

/// Asks `client` about `secret` once.
pub async fn probe(client: &mut KeyVerifyClient<Channel>, secret: &str) -> Answer {
    match tokio::time::timeout(PROBE_TIMEOUT, client.verify_key(verify(secret, &[]))).await {
        Err(_) => Answer::Silent,
        Ok(Ok(response)) => match response.into_inner().code() {
            VerifyCode::Valid => Answer::Valid,
            VerifyCode::Revoked => Answer::Revoked,
            other => Answer::Code(other),
        },
        Ok(Err(status)) if status.code() == Code::Unavailable => Answer::Unavailable,
        Ok(Err(status)) => Answer::Status(status.code()),
    }
}

/// One answer, with when it was asked and answered, since the fault.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub sent: Duration,
    pub received: Duration,
    pub answer: Answer,
}

/// Everything one node said about one key during a watch.
#[derive(Debug)]
pub struct Timeline {
    pub label: String,
    pub probes: Vec<Probe>,
}

impl Timeline {
    /// The last probe answered VALID (by when it was sent: the node was
    /// still accepting at or after that moment).
    pub fn last_valid(&self) -> Option<&Probe> {
        self.probes.iter().rev().find(|p| p.answer == Answer::Valid)
    }

    pub fn first(&self, answer: Answer) -> Option<&Probe> {
        self.probes.iter().find(|p| p.answer == answer)
    }

    pub fn first_not_valid(&self) -> Option<&Probe> {
        self.probes.iter().find(|p| p.answer != Answer::Valid)
    }

    /// A VALID answer after the node had already answered otherwise.
    pub fn valid_again(&self) -> Option<&Probe> {
        let first = self.probes.iter().position(|p| p.answer != Answer::Valid)?;
        self.probes[first..]
            .iter()
            .find(|p| p.answer == Answer::Valid)
    }

    /// The answers other than those in `allowed`.
    pub fn unexpected(&self, allowed: &[Answer]) -> Vec<&Probe> {
        self.probes
            .iter()
            .filter(|p| !allowed.contains(&p.answer))
            .collect()
    }

    /// Runs of equal answers: `VALID 0.000-3.012 s (120), UNAVAILABLE ...`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let mut runs = self.probes.chunk_by(|a, b| a.answer == b.answer).peekable();
        while let Some(run) = runs.next() {
            let (first, last) = (run[0], run[run.len() - 1]);
            let _ = write!(
                out,
                "{:?} {}-{} s ({})",
                first.answer,
                secs(first.sent),
                secs(last.received),
                run.len()
            );
            if runs.peek().is_some() {
                out.push_str(", ");
            }
        }
        if out.is_empty() {
            out.push_str("no answers");
        }
        format!("{}: {out}", self.label)
    }
}

/// `1.234`
pub fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

/// What to watch: a label, the node, the key.
pub struct Watch<'a> {
    pub label: String,
    pub node: &'a Node,
    pub secret: &'a str,
}

impl<'a> Watch<'a> {
    pub fn new(node: &'a Node, key: &'a TestKey, what: &str) -> Self {
        Watch {
            label: format!("{} node, {what}", node.name),
            node,
            secret: &key.secret,
        }
    }
}

/// Probes every target every [`PROBE_EVERY`], all at once, from now until
/// `until` after `since`, or for a target until `done` holds for its
/// answer, and prints each timeline under `scenario`. Times are relative
/// to `since`.
pub async fn watch(
    scenario: &str,
    targets: Vec<Watch<'_>>,
    since: Instant,
    until: Duration,
    done: impl Fn(Answer) -> bool + Copy + Send + 'static,
) -> Vec<Timeline> {
    let max_probes = (until.as_millis() / PROBE_EVERY.as_millis()) as usize + 1;
    let tasks: Vec<_> = targets
        .into_iter()
        .map(|target| {
            let mut client = target.node.verify();
            let secret = target.secret.to_owned();
            let label = target.label;
            tokio::spawn(async move {
                let mut probes = Vec::new();
                for _ in 0..max_probes {
                    let sent = since.elapsed();
                    if sent >= until {
                        break;
                    }
                    let answer = probe(&mut client, &secret).await;
                    probes.push(Probe {
                        sent,
                        received: since.elapsed(),
                        answer,
                    });
                    if done(answer) {
                        break;
                    }
                    tokio::time::sleep(PROBE_EVERY).await;
                }
                Timeline { label, probes }
            })
        })
        .collect();
    let mut timelines = Vec::with_capacity(tasks.len());
    for task in tasks {
        timelines.push(task.await.expect("a probe task"));
    }
    for timeline in &timelines {
        eprintln!("[{scenario}] {}", timeline.summary());
    }
    timelines
}

/// Collects what a scenario got wrong, so that one run reports every node
/// before it fails.
#[derive(Debug, Default)]
pub struct Findings(Vec<String>);

impl Findings {
    pub fn check(&mut self, holds: bool, finding: impl FnOnce() -> String) {
        if !holds {
            let finding = finding();
            eprintln!("FINDING: {finding}");
            self.0.push(finding);
        }
    }

    /// A finding unless `timeline` answered only what `allowed` lists
    /// (named `what` in the finding).
    pub fn only(&mut self, timeline: &Timeline, allowed: &[Answer], what: &str) {
        let odd = timeline.unexpected(allowed);
        self.check(odd.is_empty(), || {
            format!("{}: answers other than {what}: {odd:?}", timeline.label)
        });
    }

    /// A finding when `timeline` answered VALID again after it had answered
    /// otherwise (`after` says what that other answer meant).
    pub fn never_valid_again(&mut self, timeline: &Timeline, after: &str) {
        if let Some(again) = timeline.valid_again() {
            self.check(false, || {
                format!(
                    "{}: VALID at {} s after {after}",
                    timeline.label,
                    secs(again.sent)
                )
            });
        }
    }

    #[track_caller]
    pub fn assert_none(self, scenario: &str) {
        assert!(
            self.0.is_empty(),
            "{scenario}: {} finding(s):\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

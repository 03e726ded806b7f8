//! Issue 11, "crash storm": concurrent writers (CreateKey and RotateKey
//! with request ids, UpdateKey with and without etags, RevokeKey) against a
//! real `vilvik-keys serve` process while a fault strikes at random moments:
//!
//! - the server is `kill -9`ed and restarted on the same ports and store
//!   (SQLite file, and a Postgres cluster of the test's own);
//! - the Postgres cluster is stopped hard (`pg_ctl stop -m immediate`) and
//!   started again while the server keeps running.
//!
//! Each writer keeps a journal of every call: its parameters, request id,
//! and every attempt's outcome: acknowledged (OK), refused (a definite
//! status) or ambiguous (transport error, UNAVAILABLE, DEADLINE_EXCEEDED).
//! Ambiguous creates and rotations are retried with the same request id
//! until answered; ambiguous updates and revocations are read back. After
//! the storm the test checks, with the server up again: every key the
//! store holds is one a journal knows (no orphan), every key's last secret
//! verifies (no lost secret), each key's audit events match its committed
//! changes one for one and replay to its row, a call answered "nothing was
//! changed" changed nothing, and `vilvik-keys audit verify` exits 0.
//!
//! Each storm takes 10-40 s and is `#[ignore]`d in the default run;
//! `.ci/run` runs them (`cargo test --test storm -- --ignored
//! --test-threads=1`). Each prints its figures (`--nocapture` to see
//! them); `STORM_SEED` replays a run's random choices of moments and calls.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost_types::{FieldMask, Timestamp};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys::proto::{self, AuditAction, VerifyCode};
use vilvik_keys_domain::RequestId;
use vilvik_keys_test_db::PrivateCluster;

const BIN: &str = env!("CARGO_BIN_EXE_vilvik-keys");
const ACCOUNT: &str = "STORM";
const SCOPE: &str = "datasets:read";
const WRITERS: usize = 6;
/// Faults per storm (the issue asks for at least 5).
const FAULTS: usize = 6;
/// Active keys a writer keeps at most; past it, it revokes.
const KEYS_PER_WRITER: usize = 8;
/// A call's own deadline, above the server's request timeout (5 s), so a
/// call the server still works on is not given up by the client first.
const CALL_TIMEOUT: Duration = Duration::from_secs(8);
/// How long one call may stay unresolved (its retries and read-backs)
/// before the writer gives up on it and the test fails.
const RESOLVE_WITHIN: Duration = Duration::from_secs(60);
/// How long the server or the cluster may take to answer after a restart.
const READY_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a storm of 6 faults, 10-40 s: .ci/run runs it"]
async fn sqlite_survives_kill_9_storm() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![(
        "VILVIK_KEYS_SQLITE_PATH".to_owned(),
        dir.path().join("keys.db").display().to_string(),
    )];
    storm("SQLite, server kill -9", env, dir, None, Fault::KillServer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a storm of 6 faults, 10-40 s: .ci/run runs it"]
async fn postgres_survives_kill_9_storm() {
    let Some((cluster, env, dir)) = private_postgres().await else {
        return;
    };
    storm(
        "Postgres, server kill -9",
        env,
        dir,
        Some(cluster),
        Fault::KillServer,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a storm of 6 faults, 10-40 s: .ci/run runs it"]
async fn postgres_hard_stop_storm() {
    let Some((cluster, env, dir)) = private_postgres().await else {
        return;
    };
    storm(
        "Postgres, cluster stop -m immediate",
        env,
        dir,
        Some(cluster),
        Fault::StopPostgres,
    )
    .await;
}

/// A private cluster with database `storm`, and the environment that
/// points the binary at it (and at a pepper file in a temp dir).
async fn private_postgres() -> Option<(PrivateCluster, Vec<(String, String)>, tempfile::TempDir)> {
    // Commits acknowledged only once in the WAL: the hard stop must lose
    // none of them (with synchronous_commit off it loses the last ones,
    // and this storm reports them as lost acknowledged writes).
    let cluster = PrivateCluster::start_durable()?;
    let url = cluster.create_database("storm").await;
    let dir = tempfile::tempdir().unwrap();
    // Named explicitly, the pepper file must exist; the SQLite store's
    // default (beside the file) is generated on the first start.
    let pepper = dir.path().join("pepper");
    vilvik_keys::pepper::create(&pepper).unwrap();
    let env = vec![
        ("DATABASE_URL".to_owned(), url),
        (
            "VILVIK_KEYS_PEPPER_FILE".to_owned(),
            pepper.display().to_string(),
        ),
    ];
    Some((cluster, env, dir))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `kill -9` the server, start it again on the same ports and store.
    KillServer,
    /// `pg_ctl stop -m immediate`, start the cluster again; the server runs on.
    StopPostgres,
}

async fn storm(
    label: &str,
    store_env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    mut cluster: Option<PrivateCluster>,
    fault: Fault,
) {
    let seed = std::env::var("STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{label}: seed {seed} (STORM_SEED={seed} replays its choices)");
    let mut rng = Rng::seeded(seed);

    let management_key = bootstrap(&store_env);
    let mut server = Server::new(store_env.clone(), dir.path().join("serve.log"));
    server.start();
    let admin = Admin::new(server.admin, &management_key);
    server.wait_ready(&admin).await;
    // Before the storm the account holds the bootstrap's key alone.
    let before = admin.list_all_keys().await;
    assert_eq!(before.len(), 1, "{before:?}");
    let management_key_id = before[0].key_id.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|n| {
            let writer = Writer::new(n, server.admin, &management_key, rng.next());
            let stop = stop.clone();
            tokio::spawn(writer.run(stop))
        })
        .collect();

    let started = Instant::now();
    let mut downtimes = Vec::new();
    for _ in 0..FAULTS {
        tokio::time::sleep(Duration::from_millis(rng.between(200, 1500))).await;
        match fault {
            Fault::KillServer => {
                server.kill();
                let down = Instant::now();
                tokio::time::sleep(Duration::from_millis(rng.between(50, 500))).await;
                server.start();
                server.wait_ready(&admin).await;
                downtimes.push(down.elapsed());
            }
            Fault::StopPostgres => {
                let cluster = cluster.as_mut().expect("a Postgres storm has a cluster");
                tokio::task::block_in_place(|| cluster.stop());
                let down = Instant::now();
                tokio::time::sleep(Duration::from_millis(rng.between(300, 2000))).await;
                tokio::task::block_in_place(|| cluster.start_again());
                downtimes.push(down.elapsed());
            }
        }
    }
    // Some calls after the last fault too, then the writers finish the
    // call they are on (resolving it) and stop.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut journals = Vec::new();
    for writer in writers {
        journals.push(writer.await.expect("a writer panicked"));
    }
    let storm_took = started.elapsed();
    server.wait_ready(&admin).await;

    let figures = Figures::of(&journals);
    println!(
        "{label}: {FAULTS} faults ({}) in {:.1} s, down {}; server started {} times",
        match fault {
            Fault::KillServer => "kill -9 of the server",
            Fault::StopPostgres => "pg_ctl stop -m immediate",
        },
        storm_took.as_secs_f64(),
        downtimes
            .iter()
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        server.starts,
    );
    println!("{}", figures.table());

    let problems = check(&admin, &server, &management_key_id, &journals, &store_env).await;
    assert!(
        problems.is_empty(),
        "{label}: {} problems after the storm (seed {seed}):\n{}\nserver log (tail):\n{}",
        problems.len(),
        problems.join("\n"),
        server.log_tail()
    );
    assert!(
        figures.caught_by_a_fault() > 0,
        "{label}: no call was caught by a fault: the storm tested nothing"
    );
    drop(server);
    drop(cluster);
}

/// `vilvik-keys bootstrap --account STORM` on the store; the management key.
fn bootstrap(store_env: &[(String, String)]) -> String {
    let output = Command::new(BIN)
        .env_clear()
        .envs(store_env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .args(["bootstrap", "--account", ACCOUNT])
        .output()
        .unwrap();
    assert!(output.status.success(), "bootstrap: {output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The `vilvik-keys serve` child process, restarted on the same ports.
struct Server {
    env: Vec<(String, String)>,
    admin: SocketAddr,
    verify: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl Server {
    fn new(store_env: Vec<(String, String)>, log: PathBuf) -> Server {
        Server {
            env: store_env,
            admin: free_addr(),
            verify: free_addr(),
            log,
            child: None,
            starts: 0,
        }
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "the server runs already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("VILVIK_KEYS_ADMIN_ADDR", self.admin.to_string())
            .env("VILVIK_KEYS_VERIFY_ADDR", self.verify.to_string())
            // Room for every writer's keys, and no rate limit in the way:
            // the storm is about faults, not quotas.
            .env("VILVIK_KEYS_FREE_TIER_LIMIT", "500")
            .env("VILVIK_KEYS_PREMIUM_TIER_LIMIT", "500")
            .env("VILVIK_KEYS_ADMIN_RATE_PER_SECOND", "100000")
            .env("VILVIK_KEYS_ADMIN_RATE_BURST", "100000")
            .env("VILVIK_KEYS_STORE_TIMEOUT_MS", "2000")
            .env("VILVIK_KEYS_CHANGE_FEED_RETRY_MS", "100")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.starts += 1;
    }

    /// SIGKILL (`kill -9`), and waits until the process is gone.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("the server runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits (bounded) until an authenticated read answers OK.
    async fn wait_ready(&mut self, admin: &Admin) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().unwrap()
            {
                panic!("the server exited ({status}):\n{}", self.log_tail());
            }
            if admin.ready().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not answer within {READY_WITHIN:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A lazily connected channel: it reconnects after the server restarts.
fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(CALL_TIMEOUT)
        .connect_lazy()
}

fn bearer<T>(message: T, credential: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().unwrap(),
    );
    request
}

/// The management key's view of the account, for readiness and the checks.
struct Admin {
    channel: Channel,
    credential: String,
}

impl Admin {
    fn new(addr: SocketAddr, credential: &str) -> Admin {
        Admin {
            channel: channel(addr),
            credential: credential.to_owned(),
        }
    }

    fn client(&self) -> KeyAdminClient<Channel> {
        KeyAdminClient::new(self.channel.clone())
    }

    async fn ready(&self) -> bool {
        self.client()
            .get_account(bearer(proto::GetAccountRequest {}, &self.credential))
            .await
            .is_ok()
    }

    async fn list_all_keys(&self) -> Vec<proto::Key> {
        let mut keys = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .client()
                .list_keys(bearer(
                    proto::ListKeysRequest {
                        page_size: 100,
                        page_token: page_token.clone(),
                        include_revoked: true,
                    },
                    &self.credential,
                ))
                .await
                .expect("ListKeys after the storm")
                .into_inner();
            keys.extend(page.keys);
            if page.next_page_token.is_empty() {
                return keys;
            }
            page_token = page.next_page_token;
        }
    }

    async fn audit_events(&self, key_id: &str) -> Vec<proto::AuditEvent> {
        let mut events = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .client()
                .list_audit_events(bearer(
                    proto::ListAuditEventsRequest {
                        key_id: key_id.to_owned(),
                        page_size: 100,
                        page_token: page_token.clone(),
                    },
                    &self.credential,
                ))
                .await
                .expect("ListAuditEvents after the storm")
                .into_inner();
            events.extend(page.events);
            if page.next_page_token.is_empty() {
                return events;
            }
            page_token = page.next_page_token;
        }
    }

    async fn get_key(&self, key_id: &str) -> Result<proto::Key, Status> {
        self.client()
            .get_key(bearer(
                proto::GetKeyRequest {
                    key_id: key_id.to_owned(),
                },
                &self.credential,
            ))
            .await
            .map(|r| r.into_inner())
    }
}

/// xorshift64: the storm's choices, replayable from the printed seed.
struct Rng(u64);

impl Rng {
    fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    /// True `percent` times in 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    Create,
    Update,
    Rotate,
    Revoke,
}

/// What one attempt of a call was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Acknowledged,
    /// A definite status: the call was decided and refused.
    Refused(Code),
    /// UNAVAILABLE saying "nothing was changed": definite too.
    NothingChanged,
    /// A transport error, UNAVAILABLE without "nothing was changed",
    /// DEADLINE_EXCEEDED and the like: it may or may not have committed.
    Ambiguous(Code),
}

fn classify(status: &Status) -> Answer {
    match status.code() {
        Code::Unavailable if status.message().contains("nothing was changed") => {
            Answer::NothingChanged
        }
        code @ (Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::OutOfRange
        | Code::ResourceExhausted
        | Code::Unauthenticated
        | Code::Unimplemented) => Answer::Refused(code),
        code => Answer::Ambiguous(code),
    }
}

#[derive(Debug, Clone)]
struct Attempt {
    sent: SystemTime,
    answered: SystemTime,
    answer: Answer,
    message: String,
}

/// What a call finally did to the store, as the writer established it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Committed,
    NotCommitted,
    /// Never resolved within [`RESOLVE_WITHIN`]: a failure.
    Unknown,
}

/// One journal entry.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    /// The key it acted on (a create's, once known).
    key_id: Option<String>,
    request_id: Option<String>,
    /// The name an update set, or the etag it sent: for messages.
    params: String,
    attempts: Vec<Attempt>,
    effect: Effect,
    /// For an ambiguous call that committed: whether an attempt before the
    /// one that resolved it had committed (the retry was answered from the
    /// request id, or the read-back found the change).
    committed_before_resolution: Option<bool>,
    /// Problems the writer saw itself (a "nothing was changed" that had).
    problems: Vec<String>,
}

impl Call {
    fn new(
        method: Method,
        key_id: Option<String>,
        request_id: Option<String>,
        params: String,
    ) -> Call {
        Call {
            method,
            key_id,
            request_id,
            params,
            attempts: Vec::new(),
            effect: Effect::Unknown,
            committed_before_resolution: None,
            problems: Vec::new(),
        }
    }

    fn first_answer(&self) -> &Answer {
        &self.attempts[0].answer
    }

    fn describe(&self) -> String {
        let answers: Vec<String> = self
            .attempts
            .iter()
            .map(|a| match &a.answer {
                Answer::Acknowledged => "OK".to_owned(),
                other => format!("{other:?} ({})", a.message),
            })
            .collect();
        format!(
            "{:?} key {} request id {} params {:?}: {} -> {:?}",
            self.method,
            self.key_id.as_deref().unwrap_or("-"),
            self.request_id.as_deref().unwrap_or("-"),
            self.params,
            answers.join(", "),
            self.effect
        )
    }
}

/// A key a writer created, as its journal says it is now. No `Debug`:
/// it holds the secret.
#[derive(Clone)]
struct Owned {
    key_id: String,
    secret: String,
    name: String,
    etag: String,
    /// An etag the key had before its last change: sending it must be ABORTED.
    stale_etag: Option<String>,
    revoked: bool,
    rotations: usize,
    updates: usize,
    /// The secrets rotations replaced: none may verify VALID.
    old_secrets: Vec<String>,
}

/// One writer: its own keys, its own connection, its journal.
struct Writer {
    number: usize,
    client: KeyAdminClient<Channel>,
    credential: String,
    rng: Rng,
    keys: Vec<Owned>,
    journal: Vec<Call>,
    names: usize,
}

/// What a writer hands back: its journal and its keys' final state.
struct Journal {
    writer: usize,
    calls: Vec<Call>,
    keys: Vec<Owned>,
}

impl Writer {
    fn new(number: usize, admin: SocketAddr, credential: &str, seed: u64) -> Writer {
        Writer {
            number,
            client: KeyAdminClient::new(channel(admin)),
            credential: credential.to_owned(),
            rng: Rng::seeded(seed),
            keys: Vec::new(),
            journal: Vec::new(),
            names: 0,
        }
    }

    async fn run(mut self, stop: Arc<AtomicBool>) -> Journal {
        // Bounded: the storm lasts well under this many calls.
        for _ in 0..100_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let active: Vec<usize> = (0..self.keys.len())
                .filter(|&i| !self.keys[i].revoked)
                .collect();
            let roll = self.rng.next() % 100;
            if active.len() < 2 || (roll < 25 && active.len() < KEYS_PER_WRITER) {
                self.create().await;
                continue;
            }
            let index = active[(self.rng.next() % active.len() as u64) as usize];
            if active.len() >= KEYS_PER_WRITER || roll >= 90 {
                self.revoke(index).await;
            } else if roll < 65 {
                self.update(index).await;
            } else {
                self.rotate(index).await;
            }
        }
        Journal {
            writer: self.number,
            calls: self.journal,
            keys: self.keys,
        }
    }

    fn new_name(&mut self) -> String {
        self.names += 1;
        format!("w{}-{}", self.number, self.names)
    }

    async fn backoff(attempt: usize) {
        tokio::time::sleep(Duration::from_millis((50 * attempt as u64).min(500))).await;
    }

    /// CreateKey with a request id, retried with it until answered.
    async fn create(&mut self) {
        let name = self.new_name();
        let request_id = RequestId::generate().as_str().to_owned();
        let mut call = Call::new(Method::Create, None, Some(request_id.clone()), name.clone());
        let message = proto::CreateKeyRequest {
            name: name.clone(),
            scopes: vec![SCOPE.to_owned()],
            request_id,
            ..Default::default()
        };
        let began = Instant::now();
        loop {
            let sent = SystemTime::now();
            let result = self
                .client
                .create_key(bearer(message.clone(), &self.credential))
                .await;
            let answered = SystemTime::now();
            match result {
                Ok(response) => {
                    call.attempts
                        .push(attempt(sent, answered, Answer::Acknowledged, ""));
                    let response = response.into_inner();
                    let key = response.key.expect("CreateKey answers the key");
                    let created_at = to_system_time(key.created_at.as_ref());
                    if call.attempts.len() > 1 {
                        // The key was made by an earlier attempt when it is
                        // older than this one.
                        call.committed_before_resolution =
                            Some(created_at < truncate_to_micros(sent));
                    }
                    check_nothing_changed(&mut call, created_at, "created");
                    call.key_id = Some(key.key_id.clone());
                    call.effect = Effect::Committed;
                    self.keys.push(Owned {
                        key_id: key.key_id,
                        secret: response.secret,
                        name,
                        etag: key.etag,
                        stale_etag: None,
                        old_secrets: Vec::new(),
                        revoked: false,
                        rotations: 0,
                        updates: 0,
                    });
                    break;
                }
                Err(status) => {
                    let answer = classify(&status);
                    call.attempts
                        .push(attempt(sent, answered, answer.clone(), status.message()));
                    if let Answer::Refused(_) = answer {
                        call.effect = Effect::NotCommitted;
                        break;
                    }
                    if began.elapsed() > RESOLVE_WITHIN {
                        break;
                    }
                    Self::backoff(call.attempts.len()).await;
                }
            }
        }
        self.journal.push(call);
    }

    /// RotateKey with a request id (and sometimes the etag), retried with
    /// the same fields until answered.
    async fn rotate(&mut self, index: usize) {
        let key = self.keys[index].clone();
        let with_etag = self.rng.chance(50);
        let request_id = RequestId::generate().as_str().to_owned();
        let etag = if with_etag {
            key.etag.clone()
        } else {
            String::new()
        };
        let mut call = Call::new(
            Method::Rotate,
            Some(key.key_id.clone()),
            Some(request_id.clone()),
            format!("etag {etag:?}"),
        );
        let message = proto::RotateKeyRequest {
            key_id: key.key_id.clone(),
            request_id,
            etag,
        };
        let began = Instant::now();
        loop {
            let sent = SystemTime::now();
            let result = self
                .client
                .rotate_key(bearer(message.clone(), &self.credential))
                .await;
            let answered = SystemTime::now();
            match result {
                Ok(response) => {
                    call.attempts
                        .push(attempt(sent, answered, Answer::Acknowledged, ""));
                    let response = response.into_inner();
                    let rotated = response.key.expect("RotateKey answers the key");
                    let rotated_at = to_system_time(rotated.rotated_at.as_ref());
                    if call.attempts.len() > 1 {
                        call.committed_before_resolution =
                            Some(rotated_at < truncate_to_micros(sent));
                    }
                    check_nothing_changed(&mut call, rotated_at, "rotated");
                    call.effect = Effect::Committed;
                    let owned = &mut self.keys[index];
                    let old = std::mem::replace(&mut owned.secret, response.secret);
                    owned.old_secrets.push(old);
                    owned.stale_etag = Some(std::mem::replace(&mut owned.etag, rotated.etag));
                    owned.rotations += 1;
                    break;
                }
                Err(status) => {
                    let answer = classify(&status);
                    call.attempts
                        .push(attempt(sent, answered, answer.clone(), status.message()));
                    if let Answer::Refused(_) = answer {
                        call.effect = Effect::NotCommitted;
                        break;
                    }
                    if began.elapsed() > RESOLVE_WITHIN {
                        break;
                    }
                    Self::backoff(call.attempts.len()).await;
                }
            }
        }
        self.journal.push(call);
    }

    /// UpdateKey of the name, with the current etag, a stale one (which
    /// must be ABORTED) or none. Anything but OK is read back.
    async fn update(&mut self, index: usize) {
        let key = self.keys[index].clone();
        let name = self.new_name();
        let roll = self.rng.next() % 100;
        let (etag, stale) = match &key.stale_etag {
            Some(stale) if roll < 15 => (stale.clone(), true),
            _ if roll < 55 => (key.etag.clone(), false),
            _ => (String::new(), false),
        };
        let mut call = Call::new(
            Method::Update,
            Some(key.key_id.clone()),
            None,
            format!("name {name:?} etag {etag:?}"),
        );
        let message = proto::UpdateKeyRequest {
            key_id: key.key_id.clone(),
            name: name.clone(),
            etag,
            update_mask: Some(FieldMask {
                paths: vec!["name".to_owned()],
            }),
            ..Default::default()
        };
        let sent = SystemTime::now();
        let result = self
            .client
            .update_key(bearer(message, &self.credential))
            .await;
        let answered = SystemTime::now();
        match result {
            Ok(response) => {
                call.attempts
                    .push(attempt(sent, answered, Answer::Acknowledged, ""));
                if stale {
                    call.problems
                        .push("an update with a stale etag was acknowledged".to_owned());
                }
                let updated = response.into_inner();
                call.effect = Effect::Committed;
                let owned = &mut self.keys[index];
                owned.name = name;
                owned.stale_etag = Some(std::mem::replace(&mut owned.etag, updated.etag));
                owned.updates += 1;
            }
            Err(status) => {
                let answer = classify(&status);
                call.attempts
                    .push(attempt(sent, answered, answer.clone(), status.message()));
                if stale && matches!(answer, Answer::Refused(code) if code != Code::Aborted) {
                    call.problems
                        .push(format!("a stale etag was answered {answer:?}, not ABORTED"));
                }
                if let Some(now) = self.read_back(&key.key_id, &mut call).await {
                    let committed = now.name == name;
                    call.effect = if committed {
                        Effect::Committed
                    } else {
                        Effect::NotCommitted
                    };
                    if committed && !matches!(answer, Answer::Ambiguous(_)) {
                        call.problems
                            .push(format!("answered {answer:?} but the update was made"));
                    }
                    if matches!(answer, Answer::Ambiguous(_)) {
                        call.committed_before_resolution = Some(committed);
                    }
                    let owned = &mut self.keys[index];
                    if committed {
                        owned.name = name;
                        owned.updates += 1;
                    }
                    if now.etag != owned.etag {
                        owned.stale_etag = Some(std::mem::replace(&mut owned.etag, now.etag));
                    }
                }
            }
        }
        self.journal.push(call);
    }

    /// RevokeKey (sometimes with the etag); anything but OK is read back.
    async fn revoke(&mut self, index: usize) {
        let key = self.keys[index].clone();
        let etag = if self.rng.chance(50) {
            key.etag.clone()
        } else {
            String::new()
        };
        let mut call = Call::new(
            Method::Revoke,
            Some(key.key_id.clone()),
            None,
            format!("etag {etag:?}"),
        );
        let message = proto::RevokeKeyRequest {
            key_id: key.key_id.clone(),
            reason: "storm".to_owned(),
            etag,
        };
        let sent = SystemTime::now();
        let result = self
            .client
            .revoke_key(bearer(message, &self.credential))
            .await;
        let answered = SystemTime::now();
        match result {
            Ok(_) => {
                call.attempts
                    .push(attempt(sent, answered, Answer::Acknowledged, ""));
                call.effect = Effect::Committed;
                self.keys[index].revoked = true;
            }
            Err(status) => {
                let answer = classify(&status);
                call.attempts
                    .push(attempt(sent, answered, answer.clone(), status.message()));
                if let Some(now) = self.read_back(&key.key_id, &mut call).await {
                    let committed = now.state() == proto::KeyState::Revoked;
                    call.effect = if committed {
                        Effect::Committed
                    } else {
                        Effect::NotCommitted
                    };
                    if committed && !matches!(answer, Answer::Ambiguous(_)) {
                        call.problems
                            .push(format!("answered {answer:?} but the key was revoked"));
                    }
                    if matches!(answer, Answer::Ambiguous(_)) {
                        call.committed_before_resolution = Some(committed);
                    }
                    let owned = &mut self.keys[index];
                    owned.revoked = committed;
                    if now.etag != owned.etag {
                        owned.stale_etag = Some(std::mem::replace(&mut owned.etag, now.etag));
                    }
                }
            }
        }
        self.journal.push(call);
    }

    /// GetKey until it answers (the server or the database may be down).
    async fn read_back(&mut self, key_id: &str, call: &mut Call) -> Option<proto::Key> {
        let began = Instant::now();
        for attempt in 1.. {
            let result = self
                .client
                .get_key(bearer(
                    proto::GetKeyRequest {
                        key_id: key_id.to_owned(),
                    },
                    &self.credential,
                ))
                .await;
            match result {
                Ok(key) => return Some(key.into_inner()),
                Err(status) if matches!(classify(&status), Answer::Refused(_)) => {
                    call.problems
                        .push(format!("the read-back was refused: {status:?}"));
                    return None;
                }
                Err(_) if began.elapsed() > RESOLVE_WITHIN => return None,
                Err(_) => Self::backoff(attempt).await,
            }
        }
        None
    }
}

fn attempt(sent: SystemTime, answered: SystemTime, answer: Answer, message: &str) -> Attempt {
    Attempt {
        sent,
        answered,
        answer,
        message: message.to_owned(),
    }
}

/// A call answered "nothing was changed" on an attempt must not have made
/// the change then: the change's time (taken by the server when it began
/// the call) must fall outside every such attempt.
fn check_nothing_changed(call: &mut Call, changed_at: SystemTime, what: &str) {
    let offending: Vec<String> = call
        .attempts
        .iter()
        .filter(|a| a.answer == Answer::NothingChanged)
        .filter(|a| truncate_to_micros(a.sent) <= changed_at && changed_at <= a.answered)
        .map(|a| a.message.clone())
        .collect();
    for message in offending {
        call.problems.push(format!(
            "the key was {what} by an attempt answered \"nothing was changed\": {message}"
        ));
    }
}

fn to_system_time(at: Option<&Timestamp>) -> SystemTime {
    let at = at.expect("the timestamp is set");
    UNIX_EPOCH + Duration::new(at.seconds as u64, at.nanos as u32)
}

/// Both stores keep microseconds.
fn truncate_to_micros(at: SystemTime) -> SystemTime {
    let since = at.duration_since(UNIX_EPOCH).unwrap();
    UNIX_EPOCH + Duration::from_micros(since.as_micros() as u64)
}

/// Per method: calls by their first answer, and how ambiguous ones resolved.
#[derive(Default)]
struct Figures {
    by_method: BTreeMap<Method, Counts>,
    /// Every attempt not answered OK, by what it was told (the status and
    /// the message up to its first ';').
    failed_attempts: BTreeMap<String, usize>,
}

#[derive(Default, Debug)]
struct Counts {
    acknowledged: usize,
    refused: usize,
    nothing_changed: usize,
    ambiguous: usize,
    had_committed: usize,
    had_not: usize,
    attempts: usize,
}

impl Figures {
    fn of(journals: &[Journal]) -> Figures {
        let mut figures = Figures::default();
        for call in journals.iter().flat_map(|j| &j.calls) {
            for attempt in call
                .attempts
                .iter()
                .filter(|a| a.answer != Answer::Acknowledged)
            {
                // Refusals name the key; their status says enough.
                let key = match attempt.answer {
                    Answer::Refused(code) => format!("Refused({code:?})"),
                    ref answer => {
                        let told = attempt.message.split(';').next().unwrap_or_default();
                        format!("{answer:?}: {told}")
                    }
                };
                *figures.failed_attempts.entry(key).or_default() += 1;
            }
            let counts = figures.by_method.entry(call.method).or_default();
            counts.attempts += call.attempts.len();
            match call.first_answer() {
                Answer::Acknowledged => counts.acknowledged += 1,
                Answer::Refused(_) => counts.refused += 1,
                Answer::NothingChanged => counts.nothing_changed += 1,
                Answer::Ambiguous(_) => {
                    counts.ambiguous += 1;
                    match call.committed_before_resolution {
                        Some(true) => counts.had_committed += 1,
                        Some(false) => counts.had_not += 1,
                        None => {}
                    }
                }
            }
        }
        figures
    }

    /// Calls whose first answer was ambiguous or "nothing was changed".
    fn caught_by_a_fault(&self) -> usize {
        self.by_method
            .values()
            .map(|c| c.ambiguous + c.nothing_changed)
            .sum()
    }

    fn table(&self) -> String {
        let mut out = String::from(
            "method  calls  acknowledged  refused  nothing-changed  ambiguous (had committed / had not)  attempts\n",
        );
        for (method, c) in &self.by_method {
            let calls = c.acknowledged + c.refused + c.nothing_changed + c.ambiguous;
            writeln!(
                out,
                "{:<7} {calls:>5}  {:>12}  {:>7}  {:>15}  {:>9} ({} / {})  {:>8}",
                format!("{method:?}"),
                c.acknowledged,
                c.refused,
                c.nothing_changed,
                c.ambiguous,
                c.had_committed,
                c.had_not,
                c.attempts
            )
            .unwrap();
        }
        out.push_str("attempts not answered OK:\n");
        for (told, count) in &self.failed_attempts {
            writeln!(out, "{count:>6}  {told}").unwrap();
        }
        out
    }
}

/// The checks after the storm; one line per problem found.
async fn check(
    admin: &Admin,
    server: &Server,
    management_key_id: &str,
    journals: &[Journal],
    store_env: &[(String, String)],
) -> Vec<String> {
    let mut problems = Vec::new();
    for journal in journals {
        for call in &journal.calls {
            if call.effect == Effect::Unknown {
                problems.push(format!(
                    "writer {}: never resolved: {}",
                    journal.writer,
                    call.describe()
                ));
            }
            for problem in &call.problems {
                problems.push(format!(
                    "writer {}: {problem}: {}",
                    journal.writer,
                    call.describe()
                ));
            }
        }
    }

    // (b) No orphan: every stored key is one a journal knows, and every
    // key a journal holds is stored.
    let known: BTreeMap<&str, &Owned> = journals
        .iter()
        .flat_map(|j| &j.keys)
        .map(|k| (k.key_id.as_str(), k))
        .collect();
    let stored: BTreeSet<String> = admin
        .list_all_keys()
        .await
        .into_iter()
        .map(|k| k.key_id)
        .filter(|id| id != management_key_id)
        .collect();
    for orphan in stored.iter().filter(|id| !known.contains_key(id.as_str())) {
        problems.push(format!("orphan key {orphan}: no journal created it"));
    }
    for lost in known.keys().filter(|id| !stored.contains(**id)) {
        let calls: Vec<String> = journals
            .iter()
            .flat_map(|j| &j.calls)
            .filter(|c| c.key_id.as_deref() == Some(*lost))
            .map(Call::describe)
            .collect();
        problems.push(format!(
            "lost key {lost}: acknowledged, not stored: {calls:?}"
        ));
    }

    let mut verify = KeyVerifyClient::new(channel(server.verify));
    for owned in known.values() {
        // (a) The last secret the journal holds is the key's. A change
        // whose answer was lost reached the node's cache through the
        // change feed, not at once: allow it a few seconds.
        let expected = if owned.revoked {
            VerifyCode::Revoked
        } else {
            VerifyCode::Valid
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = verify
                .verify_key(proto::VerifyKeyRequest {
                    key: owned.secret.clone(),
                    ..Default::default()
                })
                .await
                .map(|a| a.into_inner());
            let wrong = match &answer {
                Ok(a) if a.code() == expected && a.key_id == owned.key_id => break,
                Ok(a) => format!("verifies {:?} for {:?}", a.code(), a.key_id),
                Err(status) => format!("does not verify: {status:?}"),
            };
            if Instant::now() >= deadline {
                problems.push(format!(
                    "key {}: its last secret {wrong}, expected {expected:?}",
                    owned.key_id
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // A rotated-away secret is dead (ROTATED, REVOKED, or NOT_FOUND
        // once its retention ends).
        for (n, old) in owned.old_secrets.iter().enumerate() {
            let answer = verify
                .verify_key(proto::VerifyKeyRequest {
                    key: old.clone(),
                    ..Default::default()
                })
                .await
                .map(|a| a.into_inner().code());
            if !matches!(
                answer,
                Ok(VerifyCode::Rotated | VerifyCode::Revoked | VerifyCode::NotFound)
            ) {
                problems.push(format!(
                    "key {}: its secret before rotation {} verifies {answer:?}",
                    owned.key_id,
                    n + 1
                ));
            }
        }

        // (c) Audit events one for one with the committed changes, and
        // the row a replay of them.
        let Ok(row) = admin.get_key(&owned.key_id).await else {
            continue; // reported as lost above
        };
        let events = admin.audit_events(&owned.key_id).await;
        let count = |action: AuditAction| events.iter().filter(|e| e.action() == action).count();
        let expected_counts = [
            (AuditAction::Created, 1),
            (AuditAction::Updated, owned.updates),
            (AuditAction::Rotated, owned.rotations),
            (AuditAction::Revoked, usize::from(owned.revoked)),
        ];
        for (action, expected) in expected_counts {
            if count(action) != expected {
                problems.push(format!(
                    "key {}: {} {action:?} events, the journal committed {expected}",
                    owned.key_id,
                    count(action)
                ));
            }
        }
        if let Err(problem) = replay_matches(&events, &row) {
            problems.push(format!(
                "key {}: the row is not the replay of its events: {problem}",
                owned.key_id
            ));
        }
        if row.name != owned.name {
            problems.push(format!(
                "key {}: named {:?}, the journal says {:?}",
                owned.key_id, row.name, owned.name
            ));
        }
    }

    // (d) The hash chain of the audit log is intact.
    let output = Command::new(BIN)
        .env_clear()
        .envs(store_env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .args(["audit", "verify"])
        .output()
        .unwrap();
    if !output.status.success() {
        problems.push(format!(
            "audit verify exited {}: {} {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    problems
}

/// Applies `events` in order, from nothing, and compares the result with
/// `row`: name, scopes, prefix, rotation and revocation.
fn replay_matches(events: &[proto::AuditEvent], row: &proto::Key) -> Result<(), String> {
    let mut name = None;
    let mut scopes = None;
    let mut prefix = None;
    let mut rotated = false;
    let mut revoked = false;
    for (n, event) in events.iter().enumerate() {
        let new = |field: &str| {
            event
                .changes
                .iter()
                .find(|c| c.field == field)
                .and_then(|c| c.new_value.clone())
        };
        let old = |field: &str| {
            event
                .changes
                .iter()
                .find(|c| c.field == field)
                .and_then(|c| c.old_value.clone())
        };
        match event.action() {
            AuditAction::Created => {
                if n != 0 {
                    return Err(format!("CREATED is event {n}"));
                }
                name = new("name");
                scopes = new("scopes");
                prefix = new("prefix");
            }
            AuditAction::Updated => {
                for (field, value) in [("name", &mut name), ("scopes", &mut scopes)] {
                    if let Some(changed) = new(field) {
                        if old(field) != *value {
                            return Err(format!(
                                "event {n} changes {field} from {:?}, it was {value:?}",
                                old(field)
                            ));
                        }
                        *value = Some(changed);
                    }
                }
            }
            AuditAction::Rotated => {
                if old("prefix") != prefix {
                    return Err(format!(
                        "event {n} rotates from {:?}, the prefix was {prefix:?}",
                        old("prefix")
                    ));
                }
                prefix = new("prefix");
                rotated = true;
            }
            AuditAction::Revoked => {
                if revoked {
                    return Err(format!("event {n} revokes it a second time"));
                }
                revoked = true;
            }
            other => return Err(format!("event {n} is {other:?}")),
        }
        if revoked && event.action() != AuditAction::Revoked {
            return Err(format!(
                "event {n} ({:?}) after the revocation",
                event.action()
            ));
        }
    }
    let row_scopes = row.scopes.join(" ");
    let checks = [
        ("name", name.as_deref() == Some(row.name.as_str())),
        ("scopes", scopes.as_deref() == Some(row_scopes.as_str())),
        ("prefix", prefix.as_deref() == Some(row.prefix.as_str())),
        ("rotated_at", rotated == row.rotated_at.is_some()),
        (
            "revoked",
            revoked == (row.state() == proto::KeyState::Revoked),
        ),
    ];
    let wrong: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(f, _)| *f)
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{wrong:?} differ: replay name {name:?} scopes {scopes:?} prefix {prefix:?} rotated {rotated} revoked {revoked}; row {row:?}"
        ))
    }
}

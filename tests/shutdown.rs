//! A SIGTERM while the store cannot take the last usage flush: the process
//! retries until its grace period ends, then exits with code 3 saying what
//! it abandoned; if the store comes back in time, it writes the usage and
//! exits 0. The fault is real: another connection holds the SQLite file's
//! write lock (`BEGIN IMMEDIATE`), as another process's writer would.
//!
//! And a SIGTERM under load, on both stores: calls the server had taken are
//! answered, new ones refused, the exit is clean within the grace period,
//! and no key's last use is lost (see [`sigterm_under_load`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys::proto::{
    CreateKeyRequest, ListAuditEventsRequest, VerifyCode, VerifyKeyRequest, VerifyKeyResponse,
};
use vilvik_keys_test_db::{TestDatabase, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_vilvik-keys");
const GRACE_MS: u64 = 1_500;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A `vilvik-keys serve` process on `db`, and the secret of a key of its
/// account whose use is pending (verified once, not yet flushed).
struct Served {
    child: Child,
    stderr: std::path::PathBuf,
    secret: String,
    admin: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve_with_a_pending_use(dir: &Path) -> Served {
    let db = dir.join("keys.db");
    let bootstrap = Command::new(BIN)
        .args(["bootstrap", "--account", "ACME"])
        .env("VILVIK_KEYS_SQLITE_PATH", &db)
        .output()
        .unwrap();
    assert!(bootstrap.status.success(), "{bootstrap:?}");
    let secret = String::from_utf8(bootstrap.stdout)
        .unwrap()
        .trim()
        .to_owned();

    let (admin, verify) = (free_addr(), free_addr());
    let stderr = dir.join("serve.log");
    let child = Command::new(BIN)
        .arg("serve")
        .env("VILVIK_KEYS_SQLITE_PATH", &db)
        .env("VILVIK_KEYS_ADMIN_ADDR", admin.to_string())
        .env("VILVIK_KEYS_VERIFY_ADDR", verify.to_string())
        .env("VILVIK_KEYS_USAGE_FLUSH_INTERVAL_MS", "600000")
        .env("VILVIK_KEYS_SHUTDOWN_GRACE_MS", GRACE_MS.to_string())
        .env("VILVIK_KEYS_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let served = Served {
        child,
        stderr,
        secret,
        admin,
    };
    let url = format!("http://{verify}");
    let key = served.secret.clone();
    eventually(Duration::from_secs(20), "the server answers VALID", || {
        let url = url.clone();
        let key = key.clone();
        async move {
            let Ok(channel) = Channel::from_shared(url).unwrap().connect().await else {
                return false;
            };
            let answer = KeyVerifyClient::new(channel)
                .verify_key(VerifyKeyRequest {
                    key,
                    ..Default::default()
                })
                .await;
            answer.is_ok_and(|a| a.into_inner().code() == VerifyCode::Valid)
        }
    })
    .await;
    served
}

/// Holds the database's write lock until the returned sender is used or dropped.
fn hold_write_lock(db: &Path) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let db = db.to_owned();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        let _ = release_rx.recv_timeout(Duration::from_secs(30));
        conn.execute_batch("ROLLBACK").unwrap();
    });
    locked_rx.recv().unwrap();
    (release_tx, holder)
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits (bounded) for the process to exit; its exit code.
fn exit_code(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_flush_the_store_refuses_is_retried_for_the_grace_then_abandoned() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve_with_a_pending_use(dir.path()).await;
    let (release, holder) = hold_write_lock(&dir.path().join("keys.db"));

    let asked = Instant::now();
    sigterm(&served.child);
    let code = exit_code(&mut served.child);
    let took = asked.elapsed();
    drop(release);
    holder.join().unwrap();

    let log = std::fs::read_to_string(&served.stderr).unwrap();
    assert_eq!(code, Some(3), "{log}");
    assert!(
        took >= Duration::from_millis(GRACE_MS - 300),
        "gave up after {took:?}, before the grace period"
    );
    let line = log
        .lines()
        .find(|l| l.contains("stopped, abandoning work"))
        .unwrap_or_else(|| panic!("no line saying what was abandoned in {log}"));
    assert!(line.contains(r#""usage_records":1"#), "{line}");
    assert!(line.contains(r#""requests":0"#), "{line}");
    assert!(!log.contains(&served.secret), "a secret in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_running_at_the_end_of_the_grace_is_counted_as_abandoned() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve_with_a_pending_use(dir.path()).await;
    let (release, holder) = hold_write_lock(&dir.path().join("keys.db"));
    // A create waits for the write lock (SQLite's busy timeout, 5 s), past
    // the grace period of 1.5 s.
    let channel = Channel::from_shared(format!("http://{}", served.admin))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(CreateKeyRequest {
        name: "stuck".to_owned(),
        ..Default::default()
    });
    let bearer = format!("Bearer {}", served.secret);
    request
        .metadata_mut()
        .insert("authorization", bearer.parse().unwrap());
    let create =
        tokio::spawn(async move { KeyAdminClient::new(channel).create_key(request).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !create.is_finished(),
        "the create did not wait for the lock"
    );

    sigterm(&served.child);
    let code = exit_code(&mut served.child);
    drop(release);
    holder.join().unwrap();
    let log = std::fs::read_to_string(&served.stderr).unwrap();
    assert_eq!(code, Some(3), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("stopped, abandoning work"))
        .unwrap_or_else(|| panic!("no line saying what was abandoned in {log}"));
    assert!(line.contains(r#""requests":1"#), "{line}");
    assert!(
        create.await.unwrap().is_err(),
        "the abandoned create answered OK"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_back_within_the_grace_gets_the_final_flush_and_the_exit_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let mut served = serve_with_a_pending_use(dir.path()).await;
    let last_used = |db: &Path| -> Option<i64> {
        rusqlite::Connection::open(db)
            .unwrap()
            .query_row("SELECT last_used_at FROM keys", [], |row| row.get(0))
            .unwrap()
    };
    assert_eq!(last_used(&db), None, "the use is still pending");
    let (release, holder) = hold_write_lock(&db);

    sigterm(&served.child);
    std::thread::sleep(Duration::from_millis(500));
    release.send(()).unwrap();
    holder.join().unwrap();
    let code = exit_code(&mut served.child);

    let log = std::fs::read_to_string(&served.stderr).unwrap();
    assert_eq!(code, Some(0), "{log}");
    assert!(last_used(&db).is_some(), "the pending use was not written");
}

// SIGTERM under load, on both stores.

/// Keys verified once just before the signal, their uses left pending.
const PENDING_KEYS: u16 = 200;
/// Clients verifying their own keys in a loop, and clients making admin calls.
const VERIFY_CLIENTS: u16 = 6;
const ADMIN_CLIENTS: u16 = 2;
const KEYS_PER_VERIFY_CLIENT: u16 = 5;
/// Creates held in flight across the signal by a lock on the store.
const HELD_CREATES: usize = 3;
/// How long after the signal the lock is released: the drain lasts at least this.
const HELD_AFTER_SIGNAL: Duration = Duration::from_millis(800);
/// How long after the lock's release the held verify sends its message:
/// the drain goes on that long after the creates are answered.
const VERIFY_HELD_AFTER_RELEASE: Duration = Duration::from_millis(300);
/// Time for the server to act on the signal (it logs that it drains).
const SIGNAL_HANDLED_WITHIN: Duration = Duration::from_millis(300);
/// Time for the server's GOAWAYs to reach the clients once it drains
/// (HTTP/2 graceful shutdown takes a ping's round trip); calls started
/// later must be refused.
const REFUSING_WITHIN: Duration = Duration::from_millis(200);
/// A call that takes longer is counted as hung.
const CALL_BOUND: Duration = Duration::from_secs(3);
const LOAD_GRACE_MS: u64 = 5_000;
/// Allowed past the grace period before the exit: the final flush's
/// minimum (500 ms, taken only when the drain used up the grace) and the
/// process's teardown.
const EXIT_MARGIN: Duration = Duration::from_millis(1_000);

/// The store a served process keeps its keys in.
enum KeyStore {
    Sqlite(PathBuf),
    Postgres(TestDatabase),
}

/// What the store says of one key's last use.
#[derive(Debug, Clone)]
struct StoredUse {
    written: bool,
    ip: Option<IpAddr>,
}

/// The store holding its write lock (SQLite) or an `EXCLUSIVE` lock on the
/// keys table (Postgres): creates wait, reads go on.
enum WriteLock {
    Sqlite(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>),
    Postgres(tokio_postgres::Client),
}

impl WriteLock {
    async fn release(self) {
        match self {
            WriteLock::Sqlite(release, holder) => {
                release.send(()).unwrap();
                tokio::task::spawn_blocking(move || holder.join().unwrap())
                    .await
                    .unwrap();
            }
            WriteLock::Postgres(client) => client.batch_execute("ROLLBACK").await.unwrap(),
        }
    }
}

impl KeyStore {
    /// `None` when the backend is Postgres and none is configured (skipped).
    async fn create(backend: Backend, dir: &Path) -> Option<Self> {
        Some(match backend {
            Backend::Sqlite => KeyStore::Sqlite(dir.join("keys.db")),
            Backend::Postgres => {
                let db = TestDatabase::create().await?;
                vilvik_keys::pepper::create(&dir.join("current.pepper")).unwrap();
                KeyStore::Postgres(db)
            }
        })
    }

    /// On SQLite the pepper is generated beside the file; on Postgres it is
    /// the one [`KeyStore::create`] wrote in `dir`.
    fn configure(&self, command: &mut Command, dir: &Path) {
        match self {
            KeyStore::Sqlite(path) => command
                .env("VILVIK_KEYS_SQLITE_PATH", path)
                .env_remove("DATABASE_URL"),
            KeyStore::Postgres(db) => command
                .env("DATABASE_URL", db.url())
                .env("VILVIK_KEYS_PEPPER_FILE", dir.join("current.pepper")),
        };
    }

    async fn postgres(db: &TestDatabase) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// Every key's last use as stored, by key id.
    async fn uses(&self) -> HashMap<String, StoredUse> {
        const QUERY: &str = "SELECT key_id, last_used_at IS NOT NULL, last_used_ip FROM keys";
        let rows: Vec<(String, bool, Option<String>)> = match self {
            KeyStore::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                let mut statement = conn.prepare(QUERY).unwrap();
                statement
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            }
            KeyStore::Postgres(db) => Self::postgres(db)
                .await
                .query(QUERY, &[])
                .await
                .unwrap()
                .iter()
                .map(|row| (row.get(0), row.get(1), row.get(2)))
                .collect(),
        };
        rows.into_iter()
            .map(|(key_id, written, ip)| {
                let ip = ip.map(|ip| ip.parse().expect("a stored IP address"));
                (key_id, StoredUse { written, ip })
            })
            .collect()
    }

    async fn hold_writes(&self) -> WriteLock {
        match self {
            KeyStore::Sqlite(path) => {
                let (release, holder) = hold_write_lock(path);
                WriteLock::Sqlite(release, holder)
            }
            KeyStore::Postgres(db) => {
                let client = Self::postgres(db).await;
                client
                    .batch_execute("BEGIN; LOCK TABLE keys IN EXCLUSIVE MODE")
                    .await
                    .unwrap();
                WriteLock::Postgres(client)
            }
        }
    }
}

/// Bootstraps account ACME on `store` and serves it, with pending uses kept
/// in memory (the periodic flush is ten minutes away) and limits high
/// enough for the load.
async fn serve_under_load(store: &KeyStore, dir: &Path) -> (Served, SocketAddr) {
    let mut bootstrap = Command::new(BIN);
    bootstrap.args(["bootstrap", "--account", "ACME"]);
    store.configure(&mut bootstrap, dir);
    let bootstrap = bootstrap.output().unwrap();
    assert!(bootstrap.status.success(), "{bootstrap:?}");
    let secret = String::from_utf8(bootstrap.stdout)
        .unwrap()
        .trim()
        .to_owned();

    let (admin, verify) = (free_addr(), free_addr());
    let stderr = dir.join("serve.log");
    let mut serve = Command::new(BIN);
    serve
        .arg("serve")
        .env("VILVIK_KEYS_ADMIN_ADDR", admin.to_string())
        .env("VILVIK_KEYS_VERIFY_ADDR", verify.to_string())
        .env("VILVIK_KEYS_USAGE_FLUSH_INTERVAL_MS", "600000")
        .env("VILVIK_KEYS_SHUTDOWN_GRACE_MS", LOAD_GRACE_MS.to_string())
        .env("VILVIK_KEYS_FREE_TIER_LIMIT", "10000")
        .env("VILVIK_KEYS_PREMIUM_TIER_LIMIT", "10000")
        .env("VILVIK_KEYS_ADMIN_RATE_PER_SECOND", "1000000")
        .env("VILVIK_KEYS_ADMIN_RATE_BURST", "1000000")
        .env("VILVIK_KEYS_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
    store.configure(&mut serve, dir);
    let mut served = Served {
        child: serve.spawn().unwrap(),
        stderr,
        secret,
        admin,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        if let Some(status) = served.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(&served.stderr).unwrap();
            panic!("the server stopped at start ({status}): {log}");
        }
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (served, verify)
}

fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

fn authed<T>(message: T, secret: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let bearer = format!("Bearer {secret}");
    request
        .metadata_mut()
        .insert("authorization", bearer.parse().unwrap());
    request
}

/// A created key: its id and secret.
#[derive(Debug, Clone)]
struct TestKey {
    id: String,
    secret: String,
}

async fn create_key(admin: &mut KeyAdminClient<Channel>, secret: &str, name: String) -> TestKey {
    let created = admin
        .create_key(authed(
            CreateKeyRequest {
                name,
                scopes: vec!["datasets:read".to_owned()],
                ..Default::default()
            },
            secret,
        ))
        .await
        .unwrap()
        .into_inner();
    TestKey {
        id: created.key.unwrap().key_id,
        secret: created.secret,
    }
}

async fn verify_as(
    verify: &mut KeyVerifyClient<Channel>,
    key: &TestKey,
    ip: IpAddr,
) -> Result<VerifyCode, tonic::Status> {
    let answer = verify
        .verify_key(VerifyKeyRequest {
            key: key.secret.clone(),
            required_scopes: vec!["datasets:read".to_owned()],
            client_ip: ip.to_string(),
        })
        .await?;
    Ok(answer.into_inner().code())
}

/// What became of one call.
enum Outcome {
    /// The server answered: OK, or a status of its own (`Err`).
    Answered(Result<(), tonic::Code>),
    /// Refused before the server took it: the connection was refused, the
    /// client never sent it (its connection had closed, after a GOAWAY), or
    /// HTTP/2 said the server did not process the stream (REFUSED_STREAM,
    /// or a GOAWAY whose last stream id is below it).
    Refused,
    /// Anything else, such as a connection reset under a call the server
    /// had taken: the caller cannot know whether it happened.
    Broken(String),
    /// No outcome within [`CALL_BOUND`].
    Hung,
}

fn outcome<T>(result: Result<Result<T, tonic::Status>, tokio::time::error::Elapsed>) -> Outcome {
    let status = match result {
        Err(_) => return Outcome::Hung,
        Ok(Ok(_)) => return Outcome::Answered(Ok(())),
        Ok(Err(status)) => status,
    };
    // A status the server sent has no source; the client's own carry the
    // transport error that made them.
    let Some(mut cause) = std::error::Error::source(&status) else {
        return Outcome::Answered(Err(status.code()));
    };
    loop {
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return Outcome::Refused;
        }
        // hyper cancels only requests it has not handed to the connection.
        if cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return Outcome::Refused;
        }
        if let Some(h2) = cause.downcast_ref::<h2::Error>()
            && (h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR)))
        {
            return Outcome::Refused;
        }
        match cause.source() {
            Some(next) => cause = next,
            None => return Outcome::Broken(format!("{status:?}")),
        }
    }
}

struct Call {
    client: String,
    started: Instant,
    ended: Instant,
    outcome: Outcome,
}

impl Call {
    fn describe(&self, signalled: Instant) -> String {
        let offset = |at: Instant| match at.checked_duration_since(signalled) {
            Some(after) => format!("{after:?} after"),
            None => format!("{:?} before", signalled - at),
        };
        let outcome = match &self.outcome {
            Outcome::Answered(Ok(())) => "answered OK".to_owned(),
            Outcome::Answered(Err(code)) => format!("answered {code:?}"),
            Outcome::Refused => "refused".to_owned(),
            Outcome::Broken(why) => format!("broken: {why}"),
            Outcome::Hung => format!("no outcome within {CALL_BOUND:?}"),
        };
        format!(
            "{}: started {} SIGTERM, ended {}: {outcome}",
            self.client,
            offset(self.started),
            offset(self.ended),
        )
    }
}

fn describe_some(calls: &[&Call], signalled: Instant) -> String {
    let some: Vec<String> = calls
        .iter()
        .take(5)
        .map(|c| c.describe(signalled))
        .collect();
    some.join("\n")
}

/// What one load client saw: its calls, and for a verify client the client
/// IP of each key's latest VALID answer (the use the store must end with).
#[derive(Default)]
struct Seen {
    calls: Vec<Call>,
    latest_valid: HashMap<String, IpAddr>,
    valid_answers: Vec<Instant>,
}

/// Calls until `stop` (or a bound of 30 s), pausing briefly after each
/// refusal so a stopped server is not spun against.
async fn load_client<F, Fut>(name: String, stop: Arc<AtomicBool>, mut call: F) -> Seen
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = (Outcome, Option<(String, IpAddr)>)>,
{
    let mut seen = Seen::default();
    let bound = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < bound {
        let started = Instant::now();
        let (outcome, valid) = call(n).await;
        let ended = Instant::now();
        n += 1;
        if let Some((key_id, ip)) = valid {
            seen.latest_valid.insert(key_id, ip);
            seen.valid_answers.push(ended);
        }
        let refused = matches!(outcome, Outcome::Refused);
        seen.calls.push(Call {
            client: name.clone(),
            started,
            ended,
            outcome,
        });
        if refused {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    seen
}

fn verify_client(
    verify: SocketAddr,
    client: u16,
    keys: Vec<TestKey>,
    stop: Arc<AtomicBool>,
) -> impl Future<Output = Seen> {
    let client_verify = KeyVerifyClient::new(channel(verify));
    load_client(format!("verify-{client}"), stop, move |n| {
        let mut verify = client_verify.clone();
        let key = keys[n as usize % keys.len()].clone();
        // Unique per call, so the stored IP names the use that was written.
        let ip = IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            2,
            client,
            (n as usize % keys.len()) as u16,
            0,
            0,
            (n >> 16) as u16,
            n as u16,
        ));
        async move {
            let answer = tokio::time::timeout(CALL_BOUND, verify_as(&mut verify, &key, ip)).await;
            match answer {
                Ok(Ok(VerifyCode::Valid)) => (Outcome::Answered(Ok(())), Some((key.id, ip))),
                Ok(Ok(other)) => (
                    Outcome::Broken(format!("a valid key verified as {other:?}")),
                    None,
                ),
                other => (outcome(other), None),
            }
        }
    })
}

/// Alternates listing the account's audit events (the longest read) and
/// creating a key.
fn admin_client(
    admin: SocketAddr,
    client: u16,
    secret: String,
    stop: Arc<AtomicBool>,
) -> impl Future<Output = Seen> {
    let client_admin = KeyAdminClient::new(channel(admin));
    load_client(format!("admin-{client}"), stop, move |n| {
        let mut admin = client_admin.clone();
        let secret = secret.clone();
        async move {
            let answer = if n % 2 == 0 {
                let list = ListAuditEventsRequest {
                    page_size: 100,
                    ..Default::default()
                };
                let call = admin.list_audit_events(authed(list, &secret));
                outcome(tokio::time::timeout(CALL_BOUND, call).await)
            } else {
                let create = CreateKeyRequest {
                    name: format!("load-{client}-{n}"),
                    ..Default::default()
                };
                let call = admin.create_key(authed(create, &secret));
                outcome(tokio::time::timeout(CALL_BOUND, call).await)
            };
            (answer, None)
        }
    })
}

/// How long after `since` the server logged `message` (JSON lines).
fn logged_after(log: &str, message: &str, since: time::OffsetDateTime) -> Duration {
    let line = log
        .lines()
        .find(|line| line.contains(message))
        .unwrap_or_else(|| panic!("no line {message:?} in {log}"));
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    let at = line["timestamp"].as_str().expect("a timestamp");
    let at =
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).unwrap();
    (at - since).try_into().unwrap_or(Duration::ZERO)
}

/// A VerifyKey call over raw HTTP/2 whose HEADERS are sent at once and
/// whose message waits for [`HeldVerify::finish`]: a call the server has
/// taken (its stream is open) and cannot answer yet.
struct HeldVerify {
    send: h2::SendStream<bytes::Bytes>,
    response: h2::client::ResponseFuture,
}

impl HeldVerify {
    async fn open(addr: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/vilvik.keys.v1.KeyVerify/VerifyKey"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, send) = client
            .ready()
            .await
            .unwrap()
            .send_request(request, false)
            .unwrap();
        Self { send, response }
    }

    /// Sends the message and reads the answer; an error names what broke.
    async fn finish(mut self, request: VerifyKeyRequest) -> Result<VerifyCode, String> {
        use prost::Message;
        let message = request.encode_to_vec();
        let mut frame = vec![0];
        frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&message);
        self.send
            .send_data(frame.into(), true)
            .map_err(|e| format!("cannot send the message: {e}"))?;
        let response = self.response.await.map_err(|e| format!("no answer: {e}"))?;
        let mut body = response.into_body();
        let mut answer = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("the answer broke off: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            answer.extend_from_slice(&chunk);
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| format!("no trailers: {e}"))?;
        let status = trailers.as_ref().and_then(|t| t.get("grpc-status"));
        if status.is_none_or(|s| s != "0") {
            return Err(format!("answered {trailers:?}"));
        }
        let decoded = VerifyKeyResponse::decode(answer.get(5..).unwrap_or_default())
            .map_err(|e| format!("an answer that does not decode: {e}"))?;
        Ok(decoded.code())
    }
}

/// Waits (bounded, without blocking the runtime) for the process to exit:
/// its exit code, and how long after `since` it exited.
async fn exit_after(child: &mut Child, since: Instant) -> (Option<i32>, Duration) {
    let deadline = since + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), since.elapsed());
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A SIGTERM while clients verify and call the admin API, with creates held
/// in flight by a lock on the store, a verify whose message comes only
/// after they are answered, and 200 keys' uses pending: every call the
/// server had taken is answered (the creates once the lock goes, 0.8 s into
/// the drain, the verify 0.3 s later), calls started once it drains are
/// refused at once, the process exits 0 within the grace period, and the
/// store then holds every key's last use, those answered during the drain
/// included.
async fn sigterm_under_load(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(store) = KeyStore::create(backend, dir.path()).await else {
        return;
    };
    let (mut served, verify) = serve_under_load(&store, dir.path()).await;
    let mut admin = KeyAdminClient::new(channel(served.admin));
    let mut pending = Vec::new();
    for i in 0..PENDING_KEYS {
        pending.push(create_key(&mut admin, &served.secret, format!("pending-{i}")).await);
    }
    let mut load_keys = Vec::new();
    for client in 0..VERIFY_CLIENTS {
        let mut keys = Vec::new();
        for k in 0..KEYS_PER_VERIFY_CLIENT {
            keys.push(create_key(&mut admin, &served.secret, format!("load-{client}-{k}")).await);
        }
        load_keys.push(keys);
    }
    // Used only by the verify held across the drain.
    let drained = create_key(&mut admin, &served.secret, "drained".to_owned()).await;
    let drained_ip = IpAddr::V6(Ipv6Addr::new(0xfd00, 3, 0, 0, 0, 0, 0, 1));

    // Each pending key used once, from its own address.
    let pending_ip = |i: usize| IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, i as u16));
    let mut verifier = KeyVerifyClient::new(channel(verify));
    for (i, key) in pending.iter().enumerate() {
        let code = verify_as(&mut verifier, key, pending_ip(i)).await.unwrap();
        assert_eq!(code, VerifyCode::Valid, "pending key {i}");
    }
    let before = store.uses().await;
    let written_early = pending
        .iter()
        .chain(load_keys.iter().flatten())
        .filter(|key| before[&key.id].written)
        .count();
    assert_eq!(written_early, 0, "uses were flushed before the signal");

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for (client, keys) in (0..VERIFY_CLIENTS).zip(load_keys.clone()) {
        load.spawn(verify_client(verify, client, keys, stop.clone()));
    }
    for client in 0..ADMIN_CLIENTS {
        load.spawn(admin_client(
            served.admin,
            client,
            served.secret.clone(),
            stop.clone(),
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Creates the server has taken and cannot finish before the lock goes.
    let lock = store.hold_writes().await;
    let held_verify = HeldVerify::open(verify).await;
    let held_admin = KeyAdminClient::new(channel(served.admin));
    let held: Vec<_> = (0..HELD_CREATES)
        .map(|i| {
            let mut admin = held_admin.clone();
            let create = authed(
                CreateKeyRequest {
                    name: format!("held-{i}"),
                    ..Default::default()
                },
                &served.secret,
            );
            tokio::spawn(async move { admin.create_key(create).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        held.iter().all(|create| !create.is_finished()),
        "the creates did not wait for the lock"
    );

    let (signalled, signalled_wall) = (Instant::now(), time::OffsetDateTime::now_utc());
    sigterm(&served.child);
    tokio::time::sleep(HELD_AFTER_SIGNAL).await;
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "the server exited with creates in flight"
    );
    lock.release().await;
    // The creates are answered; the verify keeps the drain going, and its
    // use is noted after they are done.
    tokio::time::sleep(VERIFY_HELD_AFTER_RELEASE).await;
    let drained_verify = held_verify.finish(VerifyKeyRequest {
        key: drained.secret.clone(),
        required_scopes: vec!["datasets:read".to_owned()],
        client_ip: drained_ip.to_string(),
    });
    let drained_answer = tokio::time::timeout(CALL_BOUND, drained_verify).await;
    let drained_answered = Instant::now();
    let (code, took) = exit_after(&mut served.child, signalled).await;
    stop.store(true, Ordering::Relaxed);
    let exited = signalled + took;

    let log = std::fs::read_to_string(&served.stderr).unwrap();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains(&served.secret), "a secret in the log");
    let grace = Duration::from_millis(LOAD_GRACE_MS);
    assert!(
        took < grace + EXIT_MARGIN,
        "exited {took:?} after SIGTERM, grace {grace:?}"
    );
    let drain_began =
        signalled + logged_after(&log, "shutting down: draining requests", signalled_wall);
    assert!(
        drain_began < signalled + SIGNAL_HANDLED_WITHIN,
        "the drain began {:?} after SIGTERM",
        drain_began - signalled
    );

    let drained_answer = drained_answer.unwrap_or_else(|_| panic!("the held verify hung"));
    assert_eq!(drained_answer, Ok(VerifyCode::Valid), "the held verify");
    assert!(
        drained_answered > drain_began,
        "the held verify was answered before the drain"
    );
    let mut held_keys = Vec::new();
    for create in held {
        let created = create.await.unwrap();
        let created = created.unwrap_or_else(|e| panic!("a create in flight failed: {e:?}"));
        held_keys.push(created.into_inner().key.unwrap().key_id);
    }
    let mut calls = Vec::new();
    let mut latest_valid = HashMap::new();
    let mut valid_answers = Vec::new();
    while let Some(seen) = load.join_next().await {
        let seen = seen.unwrap();
        calls.extend(seen.calls);
        latest_valid.extend(seen.latest_valid);
        valid_answers.extend(seen.valid_answers);
    }

    let failed: Vec<&Call> = calls
        .iter()
        .filter(|c| {
            matches!(
                c.outcome,
                Outcome::Broken(_) | Outcome::Hung | Outcome::Answered(Err(_))
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls were neither answered OK nor refused, e.g.\n{}",
        failed.len(),
        calls.len(),
        describe_some(&failed, signalled)
    );
    // Calls started before the signal and answered after it: each admin
    // client's create, held by the lock, at least.
    let in_flight = calls
        .iter()
        .filter(|c| c.started < signalled && c.ended > signalled)
        .filter(|c| matches!(c.outcome, Outcome::Answered(Ok(()))))
        .count();
    assert!(
        in_flight >= usize::from(ADMIN_CLIENTS),
        "only {in_flight} load calls were in flight at the signal"
    );
    // Once the server drains, every new call is refused until it exits.
    let late: Vec<&Call> = calls
        .iter()
        .filter(|c| c.started > drain_began + REFUSING_WITHIN && c.started < exited)
        .collect();
    assert!(!late.is_empty(), "no call was made during the drain");
    let taken: Vec<&Call> = late
        .iter()
        .copied()
        .filter(|c| !matches!(c.outcome, Outcome::Refused))
        .collect();
    assert!(
        taken.is_empty(),
        "calls started during the drain were taken:\n{}",
        describe_some(&taken, signalled)
    );
    let valid_after_signal = valid_answers.iter().filter(|&&at| at > signalled).count();
    assert!(valid_after_signal > 0, "no VALID answer after the signal");
    let answered_in_drain = calls
        .iter()
        .filter(|c| c.ended > drain_began && matches!(c.outcome, Outcome::Answered(Ok(()))))
        .count();

    // Every use is in the store: the pending ones, and each load key's
    // latest VALID answer, including those given during the drain.
    let after = store.uses().await;
    for (i, key) in pending.iter().enumerate() {
        let stored = &after[&key.id];
        assert!(stored.written, "pending key {i}: its use was lost");
        assert_eq!(stored.ip, Some(pending_ip(i)), "pending key {i}");
    }
    for key in load_keys.iter().flatten() {
        let ip = latest_valid
            .get(&key.id)
            .unwrap_or_else(|| panic!("load key {} was never answered VALID", key.id));
        let stored = &after[&key.id];
        assert!(stored.written, "load key {}: its use was lost", key.id);
        assert_eq!(
            stored.ip,
            Some(*ip),
            "load key {}: not its latest use",
            key.id
        );
    }
    let stored = &after[&drained.id];
    assert!(stored.written, "the use answered during the drain was lost");
    assert_eq!(
        stored.ip,
        Some(drained_ip),
        "the use answered during the drain"
    );
    for key_id in &held_keys {
        assert!(
            after.contains_key(key_id),
            "the held create {key_id} is not stored"
        );
    }
    eprintln!(
        "{backend:?}: {} load calls; the drain began {:?} after SIGTERM; {in_flight} load calls \
         started before SIGTERM answered OK after it, {answered_in_drain} answered OK after the \
         drain began, {valid_after_signal} VALID after SIGTERM; {HELD_CREATES} held creates and the \
         held verify answered OK in the drain; {} calls started in the drain, all refused; exit 0 \
         after {took:?} (grace {grace:?})",
        calls.len(),
        drain_began - signalled,
        late.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_calls_in_flight_refuses_new_ones_and_loses_no_use_on_sqlite() {
    sigterm_under_load(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_calls_in_flight_refuses_new_ones_and_loses_no_use_on_postgres()
{
    sigterm_under_load(Backend::Postgres).await;
}

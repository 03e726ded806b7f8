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
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys::proto::{
    CreateKeyRequest, GetAccountRequest, ListAuditEventsRequest, VerifyCode, VerifyKeyRequest,
    VerifyKeyResponse,
};
use vilvik_keys_test_support::requests::{create, verify};
use vilvik_keys_test_support::{
    Backend, ServedBinary, StoreSettings, bearer, binary, channel, eventually, lazy_channel,
    sent_first,
};

const GRACE_MS: u64 = 1_500;
/// How long a served process may take to exit after SIGTERM.
const EXIT_WITHIN: Duration = Duration::from_secs(20);

/// A `vilvik-keys serve` process, and the management key of its account.
struct Served {
    server: ServedBinary,
    secret: String,
}

/// Bootstraps account ACME on `store` and serves it with a grace period of
/// `grace_ms`, pending uses kept in memory (the periodic flush is ten
/// minutes away), JSON logs, and `env`.
async fn serve(store: &StoreSettings, grace_ms: u64, env: &[(&str, &str)]) -> Served {
    binary::migrate(store.env());
    let (secret, _) = binary::bootstrap(store.env(), "ACME");
    let server = ServedBinary::serve()
        .envs(store.env())
        .env("VILVIK_KEYS_USAGE_FLUSH_INTERVAL_MS", "600000")
        .env("VILVIK_KEYS_SHUTDOWN_GRACE_MS", grace_ms.to_string())
        .env("VILVIK_KEYS_LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .start()
        .await;
    Served { server, secret }
}

/// Serves a SQLite file in `dir` with a key of its account whose use is
/// pending (verified once, not yet flushed).
async fn serve_with_a_pending_use(dir: &Path) -> Served {
    let store = StoreSettings::sqlite(dir.join("keys.db"));
    let Served { server, secret } = serve(&store, GRACE_MS, &[]).await;
    let verifier = KeyVerifyClient::new(channel(server.verify_addr()).await);
    eventually(Duration::from_secs(20), "the server answers VALID", || {
        let mut verifier = verifier.clone();
        let request = verify(&secret, &[]);
        async move {
            let answer = verifier.verify_key(request).await;
            answer.is_ok_and(|a| a.into_inner().code() == VerifyCode::Valid)
        }
    })
    .await;
    Served { server, secret }
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

/// The line saying what the process abandoned at its exit.
fn abandoned_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("stopped, abandoning work"))
        .unwrap_or_else(|| panic!("no line saying what was abandoned in {log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_flush_the_store_refuses_is_retried_for_the_grace_then_abandoned() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve_with_a_pending_use(dir.path()).await;
    let (release, holder) = hold_write_lock(&dir.path().join("keys.db"));

    let asked = Instant::now();
    served.server.sigterm();
    let exit = served.server.wait_for_exit(EXIT_WITHIN).await;
    let took = exit.at - asked;
    drop(release);
    holder.join().unwrap();

    let log = served.server.log();
    assert_eq!(exit.code(), Some(3), "{log}");
    assert!(
        took >= Duration::from_millis(GRACE_MS - 300),
        "gave up after {took:?}, before the grace period"
    );
    let line = abandoned_line(&log);
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
    let admin = KeyAdminClient::new(channel(served.server.admin_addr()).await);
    let request = bearer(create("stuck", &[]), &served.secret);
    let mut stuck = admin.clone();
    let create = sent_first(async move { stuck.create_key(request).await }).await;
    // A later call on the same connection is answered: the server has
    // taken the create, which still waits.
    let account = bearer(GetAccountRequest {}, &served.secret);
    admin.clone().get_account(account).await.unwrap();
    assert!(
        !create.is_finished(),
        "the create did not wait for the lock"
    );

    served.server.sigterm();
    let exit = served.server.wait_for_exit(EXIT_WITHIN).await;
    drop(release);
    holder.join().unwrap();
    let log = served.server.log();
    assert_eq!(exit.code(), Some(3), "{log}");
    let line = abandoned_line(&log);
    assert!(line.contains(r#""requests":1"#), "{line}");
    assert!(
        create.await.unwrap().is_err(),
        "the abandoned create answered OK"
    );
}

/// How long the store stays locked once the drain has begun: the fault
/// lasts that long, inside the grace period of 1.5 s.
const STORE_LOCKED_FOR: Duration = Duration::from_millis(500);

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

    served.server.sigterm();
    let draining = ["shutting down: draining requests"];
    served.server.wait_for_log(&draining, EXIT_WITHIN).await;
    tokio::time::sleep(STORE_LOCKED_FOR).await;
    release.send(()).unwrap();
    holder.join().unwrap();
    let exit = served.server.wait_for_exit(EXIT_WITHIN).await;

    let log = served.server.log();
    assert_eq!(exit.code(), Some(0), "{log}");
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

/// Every key's last use as `store` holds it, by key id.
async fn uses(store: &StoreSettings) -> HashMap<String, StoredUse> {
    const QUERY: &str = "SELECT key_id, last_used_at IS NOT NULL, last_used_ip FROM keys";
    let rows: Vec<(String, bool, Option<String>)> = match store.sqlite_path() {
        Some(path) => {
            let conn = rusqlite::Connection::open(path).unwrap();
            let mut statement = conn.prepare(QUERY).unwrap();
            statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
        None => store
            .postgres_client()
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

/// Holds `store`'s writes until released.
async fn hold_writes(store: &StoreSettings) -> WriteLock {
    match store.sqlite_path() {
        Some(path) => {
            let (release, holder) = hold_write_lock(path);
            WriteLock::Sqlite(release, holder)
        }
        None => {
            let client = store.postgres_client().await;
            client
                .batch_execute("BEGIN; LOCK TABLE keys IN EXCLUSIVE MODE")
                .await
                .unwrap();
            WriteLock::Postgres(client)
        }
    }
}

/// Serves `store` with limits high enough for the load.
async fn serve_under_load(store: &StoreSettings) -> Served {
    let limits = [
        ("VILVIK_KEYS_FREE_TIER_LIMIT", "10000"),
        ("VILVIK_KEYS_PREMIUM_TIER_LIMIT", "10000"),
        ("VILVIK_KEYS_ADMIN_RATE_PER_SECOND", "1000000"),
        ("VILVIK_KEYS_ADMIN_RATE_BURST", "1000000"),
    ];
    serve(store, LOAD_GRACE_MS, &limits).await
}

/// A channel that connects on first use, its calls unbounded (the load
/// bounds them itself, by [`CALL_BOUND`]).
fn load_channel(addr: SocketAddr) -> Channel {
    lazy_channel(addr, None)
}

/// A created key: its id and secret.
#[derive(Debug, Clone)]
struct TestKey {
    id: String,
    secret: String,
}

async fn create_key(admin: &mut KeyAdminClient<Channel>, secret: &str, name: &str) -> TestKey {
    let created = admin
        .create_key(bearer(create(name, &["datasets:read"]), secret))
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

/// What the load clients share: when to stop, and how many have made a
/// round of calls (one call of each kind they make).
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    rounds_made: AtomicUsize,
}

/// Calls until `load.stop` (or a bound of 30 s), pausing briefly after each
/// refusal so a stopped server is not spun against; counts in
/// `load.rounds_made` once it has made `round` calls.
async fn load_client<F, Fut>(name: String, load: Arc<Load>, round: u32, mut call: F) -> Seen
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = (Outcome, Option<(String, IpAddr)>)>,
{
    let mut seen = Seen::default();
    let bound = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while !load.stop.load(Ordering::Relaxed) && Instant::now() < bound {
        let started = Instant::now();
        let (outcome, valid) = call(n).await;
        let ended = Instant::now();
        n += 1;
        if n == round {
            load.rounds_made.fetch_add(1, Ordering::Relaxed);
        }
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
    load: Arc<Load>,
) -> impl Future<Output = Seen> {
    let client_verify = KeyVerifyClient::new(load_channel(verify));
    let round = u32::try_from(keys.len()).unwrap();
    load_client(format!("verify-{client}"), load, round, move |n| {
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
    load: Arc<Load>,
) -> impl Future<Output = Seen> {
    let client_admin = KeyAdminClient::new(load_channel(admin));
    load_client(format!("admin-{client}"), load, 2, move |n| {
        let mut admin = client_admin.clone();
        let secret = secret.clone();
        async move {
            let answer = if n % 2 == 0 {
                let list = ListAuditEventsRequest {
                    page_size: 100,
                    ..Default::default()
                };
                let call = admin.list_audit_events(bearer(list, &secret));
                outcome(tokio::time::timeout(CALL_BOUND, call).await)
            } else {
                let create = CreateKeyRequest {
                    name: format!("load-{client}-{n}"),
                    ..Default::default()
                };
                let call = admin.create_key(bearer(create, &secret));
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
    let Some(store) = StoreSettings::create(backend, dir.path()).await else {
        return;
    };
    let mut served = serve_under_load(&store).await;
    let (admin_addr, verify) = (served.server.admin_addr(), served.server.verify_addr());
    let mut admin = KeyAdminClient::new(load_channel(admin_addr));
    let mut new_key = async |name: String| create_key(&mut admin, &served.secret, &name).await;
    let mut pending = Vec::new();
    for i in 0..PENDING_KEYS {
        pending.push(new_key(format!("pending-{i}")).await);
    }
    let mut load_keys = Vec::new();
    for client in 0..VERIFY_CLIENTS {
        let mut keys = Vec::new();
        for k in 0..KEYS_PER_VERIFY_CLIENT {
            keys.push(new_key(format!("load-{client}-{k}")).await);
        }
        load_keys.push(keys);
    }
    // Used only by the verify held across the drain.
    let drained = new_key("drained".to_owned()).await;
    let drained_ip = IpAddr::V6(Ipv6Addr::new(0xfd00, 3, 0, 0, 0, 0, 0, 1));

    // Each pending key used once, from its own address.
    let pending_ip = |i: usize| IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, i as u16));
    let mut verifier = KeyVerifyClient::new(load_channel(verify));
    for (i, key) in pending.iter().enumerate() {
        let code = verify_as(&mut verifier, key, pending_ip(i)).await.unwrap();
        assert_eq!(code, VerifyCode::Valid, "pending key {i}");
    }
    let before = uses(&store).await;
    let written_early = pending
        .iter()
        .chain(load_keys.iter().flatten())
        .filter(|key| before[&key.id].written)
        .count();
    assert_eq!(written_early, 0, "uses were flushed before the signal");

    let shared = Arc::new(Load::default());
    let mut load = tokio::task::JoinSet::new();
    for (client, keys) in (0..VERIFY_CLIENTS).zip(load_keys.clone()) {
        load.spawn(verify_client(verify, client, keys, shared.clone()));
    }
    for client in 0..ADMIN_CLIENTS {
        let secret = served.secret.clone();
        load.spawn(admin_client(admin_addr, client, secret, shared.clone()));
    }
    let clients = usize::from(VERIFY_CLIENTS + ADMIN_CLIENTS);
    eventually(
        Duration::from_secs(10),
        "every load client has used each of its keys or calls once",
        || std::future::ready(shared.rounds_made.load(Ordering::Relaxed) == clients),
    )
    .await;

    // Creates the server has taken and cannot finish before the lock goes.
    let lock = hold_writes(&store).await;
    let held_verify = HeldVerify::open(verify).await;
    let held_admin = KeyAdminClient::new(load_channel(admin_addr));
    let mut held = Vec::new();
    for i in 0..HELD_CREATES {
        let mut admin = held_admin.clone();
        let create = bearer(create(&format!("held-{i}"), &[]), &served.secret);
        held.push(sent_first(async move { admin.create_key(create).await }).await);
    }
    // A later call on the same connection is answered: the server has
    // taken the creates, which still wait.
    let account = bearer(GetAccountRequest {}, &served.secret);
    held_admin.clone().get_account(account).await.unwrap();
    assert!(
        held.iter().all(|create| !create.is_finished()),
        "the creates did not wait for the lock"
    );

    let (signalled, signalled_wall) = (Instant::now(), time::OffsetDateTime::now_utc());
    served.server.sigterm();
    // A bounded wait under test: the lock outlasts the signal by this
    // long, and the drain must wait for the creates it holds that long.
    tokio::time::sleep(HELD_AFTER_SIGNAL).await;
    assert!(
        served.server.try_exit().is_none(),
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
    let exit = served.server.wait_for_exit(EXIT_WITHIN).await;
    let (exited, took) = (exit.at, exit.at - signalled);
    shared.stop.store(true, Ordering::Relaxed);

    let log = served.server.log();
    assert_eq!(exit.code(), Some(0), "{log}");
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
    let after = uses(&store).await;
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

//! Attacks on the listeners' connections, over raw HTTP/2 and TCP on
//! loopback, while a second, well-behaved client
//! verifies a valid key and checks health:
//!
//! - stalled streams: one connection opens request streams that send
//!   HEADERS and never a message, and keeps opening them;
//! - a stalled-stream flood: several connections doing the same at once,
//!   from the same address as the well-behaved client, on each listener;
//! - an idle-connection flood: many TCP connections that never send a byte.
//!
//! Each attack runs for a bounded time with bounded counts. The fast
//! variants run by default; the `#[ignore]`d slow ones (longer, bigger) are
//! run by `.ci/run` (`--ignored connections::`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vilvik_keys::config::Config;
use vilvik_keys::proto::VerifyCode;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;

use vilvik_keys_test_support::requests::verify;
use vilvik_keys_test_support::{Backend, TestApp, spawn_app_with};

/// The share of the well-behaved client's calls that must succeed.
const REQUIRED: f64 = 0.99;

/// What the well-behaved client saw.
#[derive(Debug, Default)]
struct Observed {
    verifies: u32,
    valid: u32,
    health_checks: u32,
    serving: u32,
    /// The first few failures, for the assertion message.
    failures: Vec<String>,
}

impl Observed {
    fn failed(&mut self, what: String) {
        if self.failures.len() < 5 {
            self.failures.push(what);
        }
    }

    fn assert_served(&self) {
        eprintln!("well-behaved client: {self:?}");
        assert!(self.verifies >= 50, "too few verifies to judge: {self:?}");
        let valid = f64::from(self.valid) / f64::from(self.verifies);
        let serving = f64::from(self.serving) / f64::from(self.health_checks);
        assert!(
            valid >= REQUIRED,
            "{:.1} % of verifies VALID: {self:?}",
            valid * 100.0
        );
        assert!(
            serving >= REQUIRED,
            "{:.1} % of health checks SERVING: {self:?}",
            serving * 100.0
        );
    }
}

async fn connect(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn verify_once(observed: &mut Observed, client: &mut KeyVerifyClient<Channel>, secret: &str) {
    observed.verifies += 1;
    let answer = client.verify_key(verify(secret, &[])).await;
    match answer.map(|a| a.into_inner().code()) {
        Ok(VerifyCode::Valid) => observed.valid += 1,
        other => observed.failed(format!("verify: {other:?}")),
    }
}

async fn health(observed: &mut Observed, channel: Channel) {
    observed.health_checks += 1;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    match answer.map(|a| a.into_inner().status()) {
        Ok(ServingStatus::Serving) => observed.serving += 1,
        other => observed.failed(format!("health: {other:?}")),
    }
}

/// Until `until`: a verify of `secret` every 10 ms on the app's own
/// connection, a health check on each listener every 50 ms, and, with
/// `new_connections`, every 100 ms a verify and health check on a new
/// connection to each listener.
async fn well_behaved(
    app: &TestApp,
    secret: &str,
    until: Instant,
    new_connections: bool,
) -> Observed {
    let mut observed = Observed::default();
    let mut verifier = app.verify.clone();
    let admin_channel = connect(app.admin_addr).await.expect("admin listener");
    let verify_channel = connect(app.verify_addr).await.expect("verify listener");
    let mut round = 0u32;
    while Instant::now() < until {
        round += 1;
        verify_once(&mut observed, &mut verifier, secret).await;
        if round.is_multiple_of(5) {
            health(&mut observed, verify_channel.clone()).await;
            health(&mut observed, admin_channel.clone()).await;
        }
        if new_connections && round.is_multiple_of(10) {
            match connect(app.verify_addr).await {
                Ok(channel) => {
                    verify_once(
                        &mut observed,
                        &mut KeyVerifyClient::new(channel.clone()),
                        secret,
                    )
                    .await;
                    health(&mut observed, channel).await;
                }
                Err(e) => {
                    observed.verifies += 1;
                    observed.health_checks += 1;
                    observed.failed(format!("new verify connection: {e:?}"));
                }
            }
            match connect(app.admin_addr).await {
                Ok(channel) => health(&mut observed, channel).await,
                Err(e) => {
                    observed.health_checks += 1;
                    observed.failed(format!("new admin connection: {e:?}"));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    observed
}

/// A test app on SQLite with a key for `datasets:read`, already verified
/// once, and its secret.
pub(crate) async fn app_with_a_valid_key(configure: impl FnOnce(&mut Config)) -> (TestApp, String) {
    let mut app = spawn_app_with(Backend::Sqlite, configure).await.unwrap();
    let secret = app
        .create_key("backend", &["datasets:read"])
        .await
        .unwrap()
        .secret;
    // In memory before the attack starts, as a key in use would be.
    assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Valid);
    (app, secret)
}

// ---------------------------------------------------------------------------
// Stalled streams

/// How the server answered the attacker's streams, by `grpc-status`.
#[derive(Debug, Default)]
struct Answers {
    opened: u32,
    /// RESOURCE_EXHAUSTED at once: beyond the connection's share.
    shed: u32,
    /// CANCELLED: the call's deadline passed before its message arrived.
    timed_out: u32,
    other: u32,
    /// The server closed the connection.
    closed_by_server: bool,
    /// The latest an answer came after its stream was opened.
    slowest: Duration,
}

const VERIFY_KEY: &str = "/vilvik.keys.v1.KeyVerify/VerifyKey";
const GET_ACCOUNT: &str = "/vilvik.keys.v1.KeyAdmin/GetAccount";

fn stalled_request(addr: SocketAddr, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

async fn note_answer(
    response: h2::client::ResponseFuture,
    opened: Instant,
    answers: Arc<Mutex<Answers>>,
) {
    let Ok(response) = response.await else {
        return;
    };
    let status = response
        .headers()
        .get("grpc-status")
        .and_then(|s| s.to_str().ok())
        .map(str::to_owned);
    let mut answers = answers.lock().unwrap();
    answers.slowest = answers.slowest.max(opened.elapsed());
    match status.as_deref() {
        Some("8") => answers.shed += 1,
        Some("1") => answers.timed_out += 1,
        _ => answers.other += 1,
    }
}

/// One HTTP/2 connection to `addr` that, every `refresh`, cancels its
/// streams and opens up to `streams` new ones (as many as the server's
/// stream limit lets it within the round), each sending HEADERS only,
/// until `until`. With `refresh` past `until`, the streams are held.
async fn stall_streams(
    addr: SocketAddr,
    path: &'static str,
    streams: usize,
    refresh: Duration,
    until: Instant,
) -> Answers {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let answers = Arc::new(Mutex::new(Answers::default()));
    while Instant::now() < until {
        let round_end = (Instant::now() + refresh).min(until);
        let mut held = Vec::new();
        let mut waiting = JoinSet::new();
        for _ in 0..streams {
            let Ok(Ok(mut ready)) =
                tokio::time::timeout_at(round_end, client.clone().ready()).await
            else {
                break;
            };
            let Ok((response, send)) = ready.send_request(stalled_request(addr, path), false)
            else {
                // The server closed the connection (h2's own defences,
                // e.g. against too many resets): the attacker is done.
                answers.lock().unwrap().closed_by_server = true;
                break;
            };
            answers.lock().unwrap().opened += 1;
            held.push(send);
            waiting.spawn(note_answer(response, Instant::now(), answers.clone()));
        }
        tokio::time::sleep_until(round_end).await;
        // Dropping both halves of a stream resets it (RST_STREAM CANCEL).
        waiting.abort_all();
        while waiting.join_next().await.is_some() {}
        drop(held);
        if answers.lock().unwrap().closed_by_server {
            break;
        }
    }
    Arc::into_inner(answers).unwrap().into_inner().unwrap()
}

async fn a_stalled_stream_attack(attack: Duration, streams: usize) {
    let (app, secret) = app_with_a_valid_key(|c| {
        c.request_timeout = Duration::from_millis(1_000);
    })
    .await;
    let limits = app.config.listener_limits;
    let deadline = app.config.request_timeout;
    let until = Instant::now() + attack;
    let (answers, observed) = tokio::join!(
        stall_streams(
            app.verify_addr,
            VERIFY_KEY,
            streams,
            Duration::from_millis(500),
            until
        ),
        well_behaved(&app, &secret, until, false),
    );
    eprintln!("attacker, refreshing every 0.5 s: {answers:?}");
    observed.assert_served();
    assert!(
        answers.opened as usize >= streams,
        "the attack opened only {} streams: {answers:?}",
        answers.opened
    );
    assert!(
        answers.shed > 0,
        "no stream was beyond the connection's share: {answers:?}"
    );

    // Held without refreshing, every stalled stream is answered: those
    // within the connection's share at the call's deadline, the rest at once.
    let hold = deadline + Duration::from_secs(2);
    let stream_limit = limits.http2_max_concurrent_streams as usize;
    let answers = stall_streams(
        app.verify_addr,
        VERIFY_KEY,
        stream_limit,
        hold,
        Instant::now() + hold,
    )
    .await;
    eprintln!("attacker, holding {stream_limit} streams: {answers:?}");
    assert_eq!(
        answers.timed_out as usize, limits.verify_concurrency_per_connection,
        "{answers:?}"
    );
    assert_eq!(
        answers.shed as usize,
        stream_limit - limits.verify_concurrency_per_connection,
        "{answers:?}"
    );
    assert!(
        answers.slowest < deadline + Duration::from_millis(500),
        "a stalled stream was answered only after {:?}",
        answers.slowest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_of_stalled_streams_cannot_take_the_service_down() {
    a_stalled_stream_attack(Duration::from_secs(3), 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow (about 25 s): 1,100 stalled streams for 20 s; run by .ci/run"]
async fn one_connection_of_1100_stalled_streams_for_20_seconds() {
    a_stalled_stream_attack(Duration::from_secs(20), 1_100).await;
}

// ---------------------------------------------------------------------------
// Stalled-stream flood: many connections, one address

/// Until `until`: a GetAccount with the management key every 10 ms on the
/// app's own admin connection, and a health check of the admin listener
/// every 50 ms on another.
async fn well_behaved_admin(app: &TestApp, until: Instant) -> Observed {
    let mut observed = Observed::default();
    let mut admin = app.admin.clone();
    let admin_channel = connect(app.admin_addr).await.expect("admin listener");
    let mut round = 0u32;
    while Instant::now() < until {
        round += 1;
        observed.verifies += 1;
        let request = app.authed(vilvik_keys::proto::GetAccountRequest {});
        match admin.get_account(request).await {
            Ok(_) => observed.valid += 1,
            Err(status) => observed.failed(format!("GetAccount: {status:?}")),
        }
        if round.is_multiple_of(5) {
            health(&mut observed, admin_channel.clone()).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    observed
}

/// Which listener a flood is aimed at.
#[derive(Debug, Clone, Copy)]
enum Aim {
    Verify,
    Admin,
}

/// `connections` connections to one listener, each holding `streams`
/// stalled streams (more in all than the listener's concurrency limit) and
/// replacing them every `refresh`, for `attack`, all from 127.0.0.1 like
/// the well-behaved client, which must still be served.
async fn a_stalled_stream_flood(
    aim: Aim,
    connections: usize,
    streams: usize,
    refresh: Duration,
    attack: Duration,
) {
    let (app, secret) = app_with_a_valid_key(|c| {
        // The well-behaved admin client calls about 100 times a second,
        // and the test clock does not move: the burst covers every call of
        // the longest flood (15 s).
        c.admin_rates = vilvik_keys::config::AdminRateLimits::uniform(1_000, 100_000);
    })
    .await;
    let (addr, path, limit) = match aim {
        Aim::Verify => (
            app.verify_addr,
            VERIFY_KEY,
            app.config.verify_concurrency_limit,
        ),
        Aim::Admin => (
            app.admin_addr,
            GET_ACCOUNT,
            app.config.listener_limits.admin_concurrency_limit,
        ),
    };
    assert!(
        connections * streams > limit,
        "the flood must exceed the limit"
    );
    let until = Instant::now() + attack;
    let mut attackers = JoinSet::new();
    for _ in 0..connections {
        attackers.spawn(stall_streams(addr, path, streams, refresh, until));
    }
    let legit = async {
        match aim {
            Aim::Verify => well_behaved(&app, &secret, until, false).await,
            Aim::Admin => well_behaved_admin(&app, until).await,
        }
    };
    let (answers, observed) = tokio::join!(attackers.join_all(), legit);
    let opened: u32 = answers.iter().map(|a| a.opened).sum();
    eprintln!("attacker on the {aim:?} listener: {opened} stalled streams opened");
    assert!(
        opened as usize >= connections * streams,
        "the attack opened only {opened} streams"
    );
    observed.assert_served();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_on_many_connections_cannot_starve_verify_clients() {
    a_stalled_stream_flood(
        Aim::Verify,
        9,
        128,
        Duration::from_millis(1_500),
        Duration::from_secs(3),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_on_many_connections_cannot_starve_admin_clients() {
    a_stalled_stream_flood(
        Aim::Admin,
        5,
        64,
        Duration::from_millis(1_500),
        Duration::from_secs(3),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow (about 20 s): 9 x 128 stalled verify streams, replaced as the server ends them (request_message_timeout_ms), for 15 s; run by .ci/run"]
async fn a_stalled_stream_flood_of_9_connections_on_the_verify_listener() {
    a_stalled_stream_flood(
        Aim::Verify,
        9,
        128,
        Duration::from_secs(2),
        Duration::from_secs(15),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow (about 20 s): 5 x 64 stalled admin streams, replaced as the server ends them (request_message_timeout_ms), for 15 s; run by .ci/run"]
async fn a_stalled_stream_flood_of_5_connections_on_the_admin_listener() {
    a_stalled_stream_flood(
        Aim::Admin,
        5,
        64,
        Duration::from_secs(2),
        Duration::from_secs(15),
    )
    .await;
}

// ---------------------------------------------------------------------------
// Idle-connection flood

/// Opens `count` TCP connections spread over `over`, alternately to each
/// of `addrs`, that never send a byte; returns, for each, how long the
/// server kept it open (`None`: still open after `give_up`).
async fn flood(
    addrs: &[SocketAddr],
    count: usize,
    over: Duration,
    give_up: Duration,
) -> Vec<Option<Duration>> {
    const BATCH: usize = 50;
    let pause = over / (count / BATCH).max(1) as u32;
    let mut open = JoinSet::new();
    let mut refused = 0;
    for batch in 0..count.div_ceil(BATCH) {
        for i in 0..BATCH.min(count - batch * BATCH) {
            let addr = addrs[(batch * BATCH + i) % addrs.len()];
            let Ok(mut tcp) = TcpStream::connect(addr).await else {
                refused += 1;
                continue;
            };
            open.spawn(async move {
                let opened = Instant::now();
                let mut buf = [0; 64];
                // The server's SETTINGS arrive first; then EOF or a reset
                // when the server closes it.
                let closed = async { while let Ok(1..) = tcp.read(&mut buf).await {} };
                tokio::time::timeout(give_up, closed)
                    .await
                    .ok()
                    .map(|()| opened.elapsed())
            });
        }
        tokio::time::sleep(pause).await;
    }
    assert_eq!(refused, 0, "loopback connects failed");
    open.join_all().await
}

/// `count` idle connections over `over` against listeners capped at
/// `max_connections` that close a connection without a request after
/// `first_request_timeout`; the counts are chosen so that the cap is
/// reached and must make room.
async fn an_idle_connection_flood(
    count: usize,
    over: Duration,
    max_connections: usize,
    first_request_timeout: Duration,
) {
    let (app, secret) = app_with_a_valid_key(|c| {
        c.listener_limits.max_connections = max_connections;
        c.listener_limits.first_request_timeout = first_request_timeout;
    })
    .await;
    let addrs = [app.verify_addr, app.admin_addr];
    let give_up = first_request_timeout * 5;
    let until = Instant::now() + over + first_request_timeout;
    let (lifetimes, observed) = tokio::join!(
        flood(&addrs, count, over, give_up),
        well_behaved(&app, &secret, until, true),
    );
    observed.assert_served();
    let still_open = lifetimes.iter().filter(|l| l.is_none()).count();
    let lifetimes: Vec<Duration> = lifetimes.into_iter().flatten().collect();
    let longest = lifetimes.iter().max().copied().unwrap_or_default();
    // A connection closed by its timeout lived the whole timeout (less the
    // moment between the client's connect and the server's accept).
    let evicted = lifetimes
        .iter()
        .filter(|l| **l < first_request_timeout - Duration::from_millis(100))
        .count();
    eprintln!(
        "attacker: {count} idle connections, {evicted} closed before the first-request timeout \
         (evicted at the cap of {max_connections}), longest open {longest:?}, still open {still_open}"
    );
    assert_eq!(
        still_open, 0,
        "idle connections still open after {give_up:?}"
    );
    assert!(
        longest < first_request_timeout + Duration::from_millis(1_000),
        "an idle connection lived {longest:?}"
    );
    assert!(
        evicted > 0 && count > 2 * max_connections,
        "the cap made no room: {evicted} evicted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_flood_is_closed_and_new_clients_still_get_in() {
    an_idle_connection_flood(
        1_500,
        Duration::from_millis(1_500),
        100,
        Duration::from_millis(1_000),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow (about 15 s): 8,000 idle connections over 10 s; run by .ci/run"]
async fn an_idle_connection_flood_of_8000() {
    an_idle_connection_flood(
        8_000,
        Duration::from_secs(10),
        300,
        Duration::from_millis(3_000),
    )
    .await;
}

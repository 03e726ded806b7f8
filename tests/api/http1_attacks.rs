//! Limits and hostile input on the verify listener's HTTP face over
//! HTTP/1.1, written byte for byte on raw TCP connections to loopback (a
//! client library would refuse to send most of it):
//!
//! - slowloris: request heads dribbled a byte a second are closed by the
//!   first-request timeout (or, after a first request, the idle timeout)
//!   and take no slot of the listener's concurrency;
//! - idle keep-alive connections, each after one request, are closed by
//!   the idle timeout or evicted at the connection cap;
//! - pipelined requests in one write are all answered, in order;
//! - the headline: while one client dribbles heads on many connections from
//!   the gateway's address and another holds idle keep-alive connections
//!   (2,000 in the long variant, from 10 other addresses), each renewing
//!   its connections as the server closes them, a gateway's
//!   `/v1/authorize` calls with a valid key are still answered 200 (at
//!   least 99 %);
//! - header and body limits (431, 413, 400 naming the headers), and
//!   answers that are never a 200 for a call refused, shed or timed out
//!   (to a gateway's forward-auth check a 200 lets the request through);
//! - request smuggling (CL.TE, TE.CL, TE.TE, duplicate lengths): refused
//!   or the connection closed, and the smuggled request never answered;
//! - no answer and no log line of the real binary holds the secret.
//!
//! Each attack is bounded in connections and time. The fast variants run
//! by default; the `#[ignore]`d long one (2,000 idle keep-alive
//! connections) is run by `.ci/run` (`--ignored http1_attacks::`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use vilvik_keys::config::Config;
use vilvik_keys_test_support::{ServedBinary, StoreSettings, binary};

use crate::connections::app_with_a_valid_key;

/// The share of the gateway's calls that must be answered 200.
const REQUIRED: f64 = 0.99;
/// How long one call of a well-behaved client may take before it counts
/// as failed; far above any answer on a busy machine.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a test waits for an answer that must come.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// The sentinel sent after an attack on a connection still open: a probe
/// that asks the server to close once it has answered.
const SENTINEL: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: vilvik\r\nconnection: close\r\n\r\n";

// ---------------------------------------------------------------------------
// Raw HTTP/1.1

/// One answer, as read off the wire.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {self:?}"))
    }

    /// The body's `code`, for a JSON answer.
    fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }

    fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// An HTTP answer, not one of tonic's gRPC statuses (which is HTTP 200
    /// with `grpc-status` and an empty body).
    fn assert_http_json(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("grpc-status"), None, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        assert_eq!(self.code(), code, "{self:?}");
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The answer at the front of `buf` and the bytes it takes, once it is
/// whole; `closed`: the server has closed, so an answer delimited by the
/// close ends with `buf`.
fn parse_reply(buf: &[u8], closed: bool) -> Option<(Reply, usize)> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (name, value) = l.split_once(':').expect("a header line");
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let rest = &buf[head_end..];
    let (body, used) = if (100..200).contains(&status) || status == 204 || status == 304 {
        (Vec::new(), 0)
    } else if get("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().expect("a content-length");
        if rest.len() < len {
            return None;
        }
        (rest[..len].to_vec(), len)
    } else if closed {
        (rest.to_vec(), rest.len())
    } else {
        return None;
    };
    let reply = Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    Some((reply, head_end + used))
}

/// A chunked body at the front of `buf`, once whole, and the bytes it takes.
fn dechunk(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let line = find(&buf[at..], b"\r\n")?;
        let size = String::from_utf8_lossy(&buf[at..at + line]);
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        at += line + 2;
        if size == 0 {
            // Trailers, if any, then an empty line.
            loop {
                let line = find(&buf[at..], b"\r\n")?;
                at += line + 2;
                if line == 0 {
                    return Some((body, at));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

/// A request with `headers` (each `name: value`) and `body`, its length
/// given when it has one or is a POST.
fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nhost: vilvik\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !body.is_empty() || method == "POST" {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// A gateway's forward-auth call with `key`.
fn authorize(key: &str) -> Vec<u8> {
    request(
        "GET",
        "/v1/authorize",
        &[("authorization", &format!("Bearer {key}"))],
        b"",
    )
}

/// A client connection, with what it has read and not yet parsed.
struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// Everything the server sent, for the secret search.
    received: Vec<u8>,
    closed: bool,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Self::wrap(
            TcpStream::connect(addr)
                .await
                .expect("the listener accepts"),
        )
    }

    /// A connection from the loopback address `source` (Linux routes all of
    /// 127.0.0.0/8 to the loopback interface).
    async fn open_from(source: Ipv4Addr, addr: SocketAddr) -> std::io::Result<Conn> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source.into(), 0))?;
        Ok(Self::wrap(socket.connect(addr).await?))
    }

    fn wrap(tcp: TcpStream) -> Conn {
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        Conn {
            tcp,
            buf: Vec::new(),
            received: Vec::new(),
            closed: false,
        }
    }

    /// Writes `bytes`; false when the server has closed the connection.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.tcp.write_all(bytes).await.is_ok()
    }

    /// Reads what comes next; false once the server has closed (end of
    /// stream or reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0; 16 * 1024];
        match self.tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                self.closed = true;
                false
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.received.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Up to `n` final answers (interim 1xx ones are skipped), read until
    /// they are whole, the server closes, or `within` passes.
    async fn replies(&mut self, n: usize, within: Duration) -> Vec<Reply> {
        let until = Instant::now() + within;
        let mut replies = Vec::new();
        loop {
            while replies.len() < n {
                let Some((reply, used)) = parse_reply(&self.buf, self.closed) else {
                    break;
                };
                self.buf.drain(..used);
                if reply.status >= 200 {
                    replies.push(reply);
                }
            }
            if replies.len() >= n || self.closed {
                return replies;
            }
            if tokio::time::timeout_at(until, self.fill()).await.is_err() {
                return replies;
            }
        }
    }

    /// Whether the server closes the connection within `within`.
    async fn closes_within(&mut self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while !self.closed {
            if tokio::time::timeout_at(until, self.fill()).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// What an attack on one connection got.
#[derive(Debug)]
struct Exchange {
    /// The answers, in order: the attack's, then (when the server kept the
    /// connection open) any more, up to the sentinel's.
    replies: Vec<Reply>,
    /// The server closed the connection after its first answer (or
    /// without one): the sentinel was not answered.
    closed_after_first: bool,
    /// Every byte the server sent.
    received: Vec<u8>,
}

impl Exchange {
    fn first(&self) -> &Reply {
        self.replies
            .first()
            .unwrap_or_else(|| panic!("no answer at all: {self:?}"))
    }

    /// A smuggled `/v1/authorize` (the only request here that a valid key
    /// would get 200 and identity headers for) was answered.
    fn answered_a_smuggled_request(&self) -> bool {
        self.replies
            .iter()
            .any(|r| r.header("x-vilvik-key-id").is_some())
    }
}

/// Writes `attack` on a new connection and reads the first answer; unless
/// the server has closed the connection, writes the sentinel and reads
/// every answer up to the close. As HTTP/1.1 answers in order, a smuggled
/// request that was read as a request of its own is answered between the
/// two, and counted.
async fn exchange(addr: SocketAddr, attack: &[u8]) -> Exchange {
    let mut conn = Conn::open(addr).await;
    // The server may close before it has read all of a large attack.
    let _ = conn.send(attack).await;
    let mut replies = conn.replies(1, ANSWER_WITHIN).await;
    let mut sentinel_answered = false;
    if !conn.closed {
        // Refused by a server that is closing: then no more answers.
        let _ = conn.send(SENTINEL).await;
        let more = conn.replies(usize::MAX, ANSWER_WITHIN).await;
        assert!(conn.closed, "the server kept the connection open: {more:?}");
        sentinel_answered = more
            .last()
            .is_some_and(|r| r.status == 200 && r.body.contains("alive"));
        replies.extend(more);
    }
    Exchange {
        replies,
        closed_after_first: !sentinel_answered,
        received: conn.received,
    }
}

// ---------------------------------------------------------------------------
// Pipelining

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_in_one_write_are_all_answered_in_order() {
    let (app, secret) = app_with_a_valid_key(|_| {}).await;
    let body = format!(r#"{{"key":"{secret}","requiredScopes":["datasets:read"]}}"#);
    let mut pipeline = Vec::new();
    let mut expected = Vec::new();
    pipeline.extend(request("GET", "/healthz", &[], b""));
    expected.push(200);
    pipeline.extend(request(
        "POST",
        "/v1/keys:verify",
        &[("content-type", "application/json")],
        body.as_bytes(),
    ));
    expected.push(200);
    pipeline.extend(request(
        "GET",
        "/v1/authorize?scope=billing:write",
        &[("x-api-key", &secret)],
        b"",
    ));
    expected.push(403);
    // Alternating: the gateway's check with the key, and without one.
    for i in 0..20 {
        if i % 2 == 0 {
            pipeline.extend(authorize(&secret));
            expected.push(200);
        } else {
            pipeline.extend(request("GET", "/v1/authorize", &[], b""));
            expected.push(401);
        }
    }
    pipeline.extend(request(
        "GET",
        "/v1/keys/self",
        &[("x-api-key", &secret)],
        b"",
    ));
    expected.push(200);
    pipeline.extend(request("GET", "/readyz", &[("connection", "close")], b""));
    expected.push(200);

    let mut conn = Conn::open(app.verify_addr).await;
    assert!(conn.send(&pipeline).await);
    let replies = conn.replies(usize::MAX, ANSWER_WITHIN).await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(statuses, expected, "{replies:?}");
    assert!(conn.closed, "connection: close was not honoured");
    assert_eq!(replies[0].json()["status"], "alive");
    assert_eq!(replies[1].json()["valid"], true);
    assert_eq!(replies[2].code(), "INSUFFICIENT_SCOPE");
    for reply in &replies[3..23] {
        match reply.status {
            200 => assert!(reply.header("x-vilvik-key-id").is_some(), "{reply:?}"),
            _ => assert_eq!(reply.code(), "MISSING_KEY"),
        }
    }
    assert_eq!(replies[23].json()["name"], "backend");
    assert_eq!(replies[24].json()["status"], "ready");
    assert_no_secret(&secret, "the pipelined answers", &conn.received);
}

// ---------------------------------------------------------------------------
// Slowloris and idle keep-alive connections

/// What one attacking connection went through.
#[derive(Debug, Clone, Copy)]
struct Lifetime {
    /// From its connect, or from the answer to its one request, to the
    /// server's close; `None`: still open when the attacker gave up.
    open_for: Option<Duration>,
    /// Bytes of the unfinished head it sent.
    dribbled: usize,
}

/// One connection from `source` that sends the start of a request head
/// (after one whole request and its answer, with `after_a_request`), then
/// one more byte a second, never finishing it, until the server closes it
/// or `give_up` passes. `None` when the connection could not be made or
/// its first request was not answered (closed at a cap before it spoke).
async fn dribble(
    addr: SocketAddr,
    source: Ipv4Addr,
    after_a_request: bool,
    give_up: Duration,
) -> Option<Lifetime> {
    let mut conn = Conn::open_from(source, addr).await.ok()?;
    if after_a_request {
        if !conn.send(&request("GET", "/healthz", &[], b"")).await {
            return None;
        }
        let answered = conn.replies(1, ANSWER_WITHIN).await;
        if answered.first().map(|r| r.status) != Some(200) {
            return None;
        }
    }
    let start = Instant::now();
    let head = b"GET /v1/authorize HTTP/1.1\r\nhost: vilvik\r\nx-dribble: ";
    let mut dribbled = head.len();
    if !conn.send(head).await {
        return Some(Lifetime {
            open_for: Some(start.elapsed()),
            dribbled,
        });
    }
    while start.elapsed() < give_up {
        match tokio::time::timeout(Duration::from_secs(1), conn.fill()).await {
            // A byte a second.
            Err(_) => {
                if !conn.send(b"a").await {
                    break;
                }
                dribbled += 1;
            }
            Ok(false) => break,
            Ok(true) => {}
        }
        if conn.closed {
            break;
        }
    }
    let closed = conn.closed || !conn.send(b"a").await || conn.closes_within(Duration::ZERO).await;
    Some(Lifetime {
        open_for: closed.then(|| start.elapsed()),
        dribbled,
    })
}

/// A gateway's calls, as the well-behaved client saw them.
#[derive(Debug, Default)]
struct Gateway {
    calls: u32,
    allowed: u32,
    /// The first few failures, for the assertion message.
    failures: Vec<String>,
}

impl Gateway {
    fn share(&self) -> f64 {
        f64::from(self.allowed) / f64::from(self.calls.max(1))
    }

    fn assert_served(&self, min_calls: u32) {
        eprintln!(
            "gateway: {} of {} /v1/authorize calls answered 200 ({:.2} %); first failures: {:?}",
            self.allowed,
            self.calls,
            self.share() * 100.0,
            self.failures
        );
        assert!(self.calls >= min_calls, "too few calls to judge: {self:?}");
        assert!(
            self.share() >= REQUIRED,
            "{:.2} % of the gateway's calls answered 200: {self:?}",
            self.share() * 100.0
        );
    }
}

/// One `/v1/authorize` call with `secret` on `conn` (opened first when
/// `None`, dropped when the server closed it).
async fn call(conn: &mut Option<Conn>, addr: SocketAddr, secret: &str) -> Result<Reply, String> {
    let fresh = conn.is_none();
    if conn.is_none() {
        let opened = tokio::time::timeout(CALL_TIMEOUT, TcpStream::connect(addr)).await;
        match opened {
            Ok(Ok(tcp)) => *conn = Some(Conn::wrap(tcp)),
            other => return Err(format!("connect: {other:?}")),
        }
    }
    let open = conn.as_mut().expect("a connection");
    let sent = open.send(&authorize(secret)).await;
    let mut replies = if sent {
        open.replies(1, CALL_TIMEOUT).await
    } else {
        Vec::new()
    };
    let closed = open.closed;
    if closed {
        *conn = None;
    }
    replies.pop().ok_or_else(|| {
        format!(
            "no answer (sent: {sent}, closed by the server: {closed}, on a new connection: {fresh})"
        )
    })
}

/// Until `until`: a `/v1/authorize` call with `secret` every 10 ms on a
/// keep-alive connection, every tenth on a new connection instead.
async fn gateway(addr: SocketAddr, secret: &str, until: Instant) -> Gateway {
    let mut seen = Gateway::default();
    let mut kept = None;
    let mut round = 0u32;
    while Instant::now() < until {
        round += 1;
        let answer = if round.is_multiple_of(10) {
            call(&mut None, addr, secret).await
        } else {
            call(&mut kept, addr, secret).await
        };
        seen.calls += 1;
        match answer {
            Ok(reply) if reply.status == 200 && reply.header("x-vilvik-key-id").is_some() => {
                seen.allowed += 1
            }
            other => {
                if seen.failures.len() < 5 {
                    seen.failures.push(format!("{other:?}"));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dribbled_heads_are_closed_by_the_first_request_or_idle_timeout_and_take_no_slot() {
    let first_request = Duration::from_secs(2);
    let idle = Duration::from_secs(2);
    let (app, secret) = app_with_a_valid_key(|c| {
        c.listener_limits.first_request_timeout = first_request;
        c.listener_limits.idle_timeout = idle;
        // Far fewer slots than dribbling connections: a head still
        // arriving must hold none.
        c.verify_concurrency_limit = 4;
        c.listener_limits.verify_concurrency_per_connection = 4;
    })
    .await;
    let addr = app.verify_addr;
    let give_up = Duration::from_secs(15);
    let mut attackers = JoinSet::new();
    for i in 0..60 {
        // Two thirds dribble a first head, a third the head of a second
        // request on a keep-alive connection.
        let after_a_request = i % 3 == 2;
        attackers.spawn(async move {
            let lifetime = dribble(addr, Ipv4Addr::LOCALHOST, after_a_request, give_up).await;
            (after_a_request, lifetime)
        });
    }
    let seen = gateway(addr, &secret, Instant::now() + first_request + idle).await;
    let outcomes = attackers.join_all().await;
    seen.assert_served(100);
    let margin = Duration::from_secs(3);
    for (after_a_request, lifetime) in &outcomes {
        let lifetime = lifetime.expect("each dribbling connection was opened");
        let open_for = lifetime
            .open_for
            .unwrap_or_else(|| panic!("still open after {give_up:?}: {lifetime:?}"));
        let (timeout, which) = if *after_a_request {
            (idle, "idle")
        } else {
            (first_request, "first-request")
        };
        // Closed by our timeout (the client starts counting a moment after
        // the server), not by hyper's own (30 s) header timeout.
        assert!(
            open_for >= timeout / 2 && open_for < timeout + margin,
            "a dribbling connection lived {open_for:?} with the {which} timeout at {timeout:?}"
        );
    }
    let longest = outcomes
        .iter()
        .filter_map(|(_, l)| l.and_then(|l| l.open_for))
        .max();
    eprintln!(
        "slowloris: {} connections dribbling a byte a second, all closed; longest open {longest:?}",
        outcomes.len()
    );
}

/// A connection from `source` whose one request (`GET /healthz`) was
/// answered; `None` when it could not be made or was closed first (at a
/// cap, before it spoke).
async fn one_request(addr: SocketAddr, source: Ipv4Addr) -> Option<Conn> {
    let mut conn = Conn::open_from(source, addr).await.ok()?;
    if !conn.send(&request("GET", "/healthz", &[], b"")).await {
        return None;
    }
    let replies = conn.replies(1, ANSWER_WITHIN).await;
    (replies.first().map(|r| r.status) == Some(200)).then_some(conn)
}

/// Holds `conn`, answered a moment ago, open and silent until the server
/// closes it: how long that took, or `None` when it was still open after
/// `give_up`. `held` counts the connections held now, `peak` the most.
async fn hold(
    mut conn: Conn,
    give_up: Duration,
    held: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
) -> Option<Duration> {
    let answered = Instant::now();
    let now_held = held.fetch_add(1, Ordering::AcqRel) + 1;
    peak.fetch_max(now_held, Ordering::AcqRel);
    let closed = conn.closes_within(give_up).await;
    held.fetch_sub(1, Ordering::AcqRel);
    closed.then(|| answered.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_at_the_idle_timeout_or_evicted_at_the_cap() {
    let idle = Duration::from_millis(1_500);
    let max_connections = 150;
    let (app, _secret) = app_with_a_valid_key(|c| {
        c.listener_limits.idle_timeout = idle;
        c.listener_limits.max_connections = max_connections;
    })
    .await;
    let held = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    // 400 connections, one after another, 100 from each of 4 addresses
    // (under the cap per address), more than the listener's cap: each
    // makes one request, then stays, silent.
    let mut holders = JoinSet::new();
    let mut refused = 0;
    for i in 0..400usize {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % 4) as u8);
        match one_request(app.verify_addr, source).await {
            Some(conn) => {
                holders.spawn(hold(conn, idle * 5, held.clone(), peak.clone()));
            }
            None => refused += 1,
        }
    }
    let idle_for = holders.join_all().await;
    let answered = idle_for.len();
    let still_open = idle_for.iter().filter(|d| d.is_none()).count();
    let idle_for: Vec<Duration> = idle_for.into_iter().flatten().collect();
    let evicted = idle_for
        .iter()
        .filter(|d| **d + Duration::from_millis(200) < idle)
        .count();
    let longest = idle_for.iter().max().copied().unwrap_or_default();
    eprintln!(
        "idle keep-alive: {answered} answered ({refused} not), at most {} held at once, {evicted} \
         evicted at the cap of {max_connections} before the idle timeout, longest idle {longest:?}, \
         still open {still_open}",
        peak.load(Ordering::Acquire)
    );
    // One at a time, every connection gets in: the cap closes an idle one.
    assert_eq!(refused, 0);
    assert_eq!(still_open, 0, "idle connections outlived {:?}", idle * 5);
    assert!(
        longest < idle + Duration::from_secs(2),
        "an idle connection lived {longest:?} after its answer"
    );
    assert!(
        evicted >= 400 - 2 * max_connections,
        "the cap evicted only {evicted} idle connections"
    );
}

/// Until `until` (and for at most `rounds` connections), one connection
/// after another from `source` makes one request, then stays open and
/// silent until the server closes it: (connections opened, answered,
/// still open after `give_up`).
async fn idle_keep_alive(
    addr: SocketAddr,
    source: Ipv4Addr,
    until: Instant,
    rounds: usize,
    held: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
) -> (usize, usize, usize) {
    let give_up = Duration::from_secs(15);
    let (mut opened, mut answered, mut still_open) = (0, 0, 0);
    for _ in 0..rounds {
        if Instant::now() >= until {
            break;
        }
        opened += 1;
        let Some(conn) = one_request(addr, source).await else {
            continue;
        };
        answered += 1;
        if hold(conn, give_up, held.clone(), peak.clone())
            .await
            .is_none()
        {
            still_open += 1;
            break;
        }
    }
    (opened, answered, still_open)
}

/// The headline: while one attacker dribbles heads on `dribblers`
/// connections from the gateway's own address and another holds `idlers`
/// idle keep-alive connections from 10 other addresses, each reconnecting
/// as the server closes its connections, a gateway's `/v1/authorize` calls
/// are answered 200. With `max_connections`, the listener's cap is lower
/// than the attack, and makes room.
async fn a_gateway_under_slowloris_and_idle_floods(
    dribblers: usize,
    idlers: usize,
    max_connections: Option<usize>,
    attack: Duration,
) {
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("the descriptor limit");
    assert!(
        limit as usize > 2 * (dribblers + idlers) + 1_000,
        "the descriptor limit ({limit}) is too low for this test"
    );
    let (app, secret) = app_with_a_valid_key(|c: &mut Config| {
        c.listener_limits.first_request_timeout = Duration::from_secs(2);
        c.listener_limits.idle_timeout = Duration::from_secs(3);
        if let Some(max) = max_connections {
            c.listener_limits.max_connections = max;
        }
    })
    .await;
    let addr = app.verify_addr;
    let until = Instant::now() + attack;
    let held = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut idle_flood = JoinSet::new();
    for i in 0..idlers {
        if i > 0 && i.is_multiple_of(100) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % 10) as u8);
        idle_flood.spawn(idle_keep_alive(
            addr,
            source,
            until,
            100,
            held.clone(),
            peak.clone(),
        ));
    }
    let mut slowloris = JoinSet::new();
    for _ in 0..dribblers {
        slowloris.spawn(async move {
            let mut lifetimes = Vec::new();
            for _ in 0..100 {
                if Instant::now() >= until {
                    break;
                }
                let lifetime =
                    dribble(addr, Ipv4Addr::LOCALHOST, false, Duration::from_secs(15)).await;
                lifetimes.extend(lifetime);
            }
            lifetimes
        });
    }
    // Once the floods are under way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = gateway(addr, &secret, until).await;
    let idle_flood = idle_flood.join_all().await;
    let lifetimes: Vec<Lifetime> = slowloris.join_all().await.into_iter().flatten().collect();
    let opened: usize = idle_flood.iter().map(|i| i.0).sum();
    let answered: usize = idle_flood.iter().map(|i| i.1).sum();
    let idle_still_open: usize = idle_flood.iter().map(|i| i.2).sum();
    let slow_open = lifetimes.iter().filter(|l| l.open_for.is_none()).count();
    let dribbled: usize = lifetimes.iter().map(|l| l.dribbled).sum();
    eprintln!(
        "attackers: {} slowloris connections ({dribbled} bytes of heads, a byte a second), \
         {opened} idle keep-alive connections opened, {answered} answered, at most {} idle at once; \
         listener cap {max_connections:?}",
        lifetimes.len(),
        peak.load(Ordering::Acquire)
    );
    seen.assert_served(100);
    assert_eq!(slow_open, 0, "slowloris connections outlived 15 s");
    assert_eq!(idle_still_open, 0, "idle connections outlived 15 s");
    assert!(
        peak.load(Ordering::Acquire) > idlers / 2,
        "the idle flood never held many connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_is_answered_while_heads_dribble_and_idle_connections_pile_up() {
    a_gateway_under_slowloris_and_idle_floods(50, 400, None, Duration::from_secs(4)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow (about 20 s): 200 slowloris and 2,000 idle keep-alive connections for 15 s; run by .ci/run"]
async fn a_gateway_is_answered_under_200_slowloris_and_2000_idle_keep_alive_connections() {
    a_gateway_under_slowloris_and_idle_floods(200, 2_000, None, Duration::from_secs(15)).await;
}

// ---------------------------------------------------------------------------
// Header and body limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_bodies_and_ambiguous_or_unreadable_keys_are_refused() {
    let (app, secret) = app_with_a_valid_key(|_| {}).await;
    let addr = app.verify_addr;
    let bearer = format!("Bearer {secret}");
    let filler = "x".repeat(20 * 1024);

    // Over the face's 16 KiB of headers, on a route that reads a key.
    let over = exchange(
        addr,
        &request(
            "GET",
            "/v1/authorize",
            &[("authorization", &bearer), ("x-filler", &filler)],
            b"",
        ),
    )
    .await;
    over.first().assert_http_json(431, "HEADERS_TOO_LARGE");
    assert!(over.first().message().contains("16384"), "{over:?}");
    // Far over, beyond hyper's buffer for a head (about 400 KiB): hyper's
    // own 431, and the connection closed.
    let far = "x".repeat(8 * 1024);
    let mut huge = vec![("authorization", bearer.as_str())];
    huge.extend(std::iter::repeat_n(("x-filler", far.as_str()), 64));
    let far_over = exchange(addr, &request("GET", "/v1/authorize", &huge, b"")).await;
    eprintln!(
        "a 512 KiB head: {:?}, closed: {}",
        far_over.replies.first().map(|r| r.status),
        far_over.closed_after_first
    );
    assert!(far_over.closed_after_first, "{far_over:?}");
    assert!(
        far_over.replies.iter().all(|r| r.status == 431),
        "{far_over:?}"
    );
    // More header lines than hyper parses (100).
    let many: Vec<(&str, &str)> = std::iter::repeat_n(("x-many", "1"), 120).collect();
    let too_many = exchange(addr, &request("GET", "/v1/authorize", &many, b"")).await;
    assert_eq!(too_many.first().status, 431, "{too_many:?}");
    assert!(too_many.closed_after_first);

    // A body over the 64 KiB limit, by length and chunked.
    let big = format!(r#"{{"key":"{secret}","pad":"{}"}}"#, "p".repeat(70 * 1024));
    let json = [("content-type", "application/json")];
    let sized = exchange(
        addr,
        &request("POST", "/v1/keys:verify", &json, big.as_bytes()),
    )
    .await;
    sized.first().assert_http_json(413, "PAYLOAD_TOO_LARGE");
    assert!(sized.first().message().contains("65536"), "{sized:?}");
    let mut chunked = b"POST /v1/keys:verify HTTP/1.1\r\nhost: vilvik\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for piece in big.as_bytes().chunks(8 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let chunked = exchange(addr, &chunked).await;
    chunked.first().assert_http_json(413, "PAYLOAD_TOO_LARGE");

    // Two keys: two Authorization headers, or Authorization and X-API-Key.
    let other = "vlk_AAAAAAAA_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB000000";
    let other_bearer = format!("Bearer {other}");
    let twice = exchange(
        addr,
        &request(
            "GET",
            "/v1/authorize",
            &[("authorization", &bearer), ("authorization", &other_bearer)],
            b"",
        ),
    )
    .await;
    twice.first().assert_http_json(400, "AMBIGUOUS_KEY");
    assert!(twice.first().message().contains("authorization headers"));
    let both = exchange(
        addr,
        &request(
            "GET",
            "/v1/keys/self",
            &[("authorization", &bearer), ("x-api-key", other)],
            b"",
        ),
    )
    .await;
    both.first().assert_http_json(400, "AMBIGUOUS_KEY");
    let message = both.first().message();
    assert!(
        message.contains("authorization") && message.contains("x-api-key"),
        "{message}"
    );

    // A key header with bytes that are not ASCII (obs-text, 0x80-0xff).
    for (header, prefix) in [("x-api-key", &b""[..]), ("authorization", &b"Bearer "[..])] {
        let mut raw = b"GET /v1/authorize HTTP/1.1\r\nhost: vilvik\r\n".to_vec();
        raw.extend_from_slice(header.as_bytes());
        raw.extend_from_slice(b": ");
        raw.extend_from_slice(prefix);
        raw.extend_from_slice(b"vlk_\x80\xff\xfe\xc3\x28");
        raw.extend_from_slice(b"\r\n\r\n");
        let unreadable = exchange(addr, &raw).await;
        unreadable.first().assert_http_json(400, "UNREADABLE_KEY");
        assert!(unreadable.first().message().contains(header));
    }

    // A key header far longer than a key.
    let long = format!("{secret}{}", "A".repeat(1_000));
    let too_long = exchange(
        addr,
        &request("GET", "/v1/authorize", &[("x-api-key", &long)], b""),
    )
    .await;
    too_long.first().assert_http_json(431, "KEY_TOO_LONG");

    for exchanged in [
        &over, &far_over, &too_many, &sized, &chunked, &twice, &both, &too_long,
    ] {
        assert_no_secret(&secret, "a refusal", &exchanged.received);
    }
}

// ---------------------------------------------------------------------------
// Never a 200 for a call that was not judged

/// Answers a gateway takes for "allowed" unless the route judged the key:
/// a request the transport refused, shed or timed out must get an HTTP
/// refusal, never tonic's gRPC status (HTTP 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_refused_shed_or_timed_out_is_never_answered_200() {
    let (app, _secret) = app_with_a_valid_key(|c| {
        // Shorter than request_message_timeout_ms (2 s), so the deadline
        // ends a request whose body never comes.
        c.request_timeout = Duration::from_millis(500);
        c.listener_limits.verify_concurrency_per_connection = 1;
    })
    .await;
    let addr = app.verify_addr;

    // Claiming to be gRPC does not make a call to an HTTP route one.
    let claimed = exchange(
        addr,
        &request(
            "GET",
            "/v1/authorize",
            &[("content-type", "application/grpc")],
            b"",
        ),
    )
    .await;
    claimed.first().assert_http_json(401, "MISSING_KEY");
    let claimed_post = exchange(
        addr,
        &request(
            "POST",
            "/v1/authorize",
            &[("content-type", "application/grpc+proto")],
            b"\x01\x00\x00\x00\x01x",
        ),
    )
    .await;
    claimed_post.first().assert_http_json(401, "MISSING_KEY");

    // A body that never comes, past the request deadline.
    let late = b"POST /v1/authorize HTTP/1.1\r\nhost: vilvik\r\ncontent-length: 10\r\n\r\n";
    let timed_out = exchange(addr, late).await;
    timed_out.first().assert_http_json(503, "TIMEOUT");
    assert!(
        timed_out.first().message().contains("500 ms"),
        "{timed_out:?}"
    );
    // Or a deadline of its own, gRPC's: not for an HTTP request.
    let own = b"POST /v1/authorize HTTP/1.1\r\nhost: vilvik\r\ngrpc-timeout: 1m\r\ncontent-length: 10\r\n\r\n";
    let own = exchange(addr, own).await;
    own.first().assert_http_json(400, "INVALID_ARGUMENT");
    assert!(own.first().message().contains("grpc-timeout"), "{own:?}");

    // Shed: over HTTP/2, with a connection's share of 1, a request whose
    // body never comes holds the share, and the gateway's checks on the
    // same connection are beyond it. hyper starts each stream's task on
    // its own, so a check may still come first (then the stalled request
    // is the one shed, or they do not overlap): a new stalled request is
    // opened until a check is shed.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut answers = Vec::new();
    let mut shed = None;
    'stall: for _ in 0..20 {
        let stalled = http::Request::post(format!("http://{addr}/v1/keys:verify"))
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        let mut ready = client.clone().ready().await.unwrap();
        let (stalled, stalled_body) = ready.send_request(stalled, false).unwrap();
        let stalled = tokio::spawn(async move {
            let _held = stalled_body;
            h2_reply(stalled).await
        });
        for _ in 0..20 {
            let check = http::Request::get(format!("http://{addr}/v1/authorize"))
                .body(())
                .unwrap();
            let mut ready = client.clone().ready().await.unwrap();
            let (check, _) = ready.send_request(check, true).unwrap();
            let check = h2_reply(check).await;
            if check.status == 503 {
                check.assert_http_json(503, "OVERLOADED");
                shed = Some(check);
                break 'stall;
            }
            check.assert_http_json(401, "MISSING_KEY");
            answers.push(check);
            if stalled.is_finished() {
                break;
            }
        }
        let stalled = stalled.await.unwrap();
        let code = stalled.code();
        assert!(code == "TIMEOUT" || code == "OVERLOADED", "{stalled:?}");
        stalled.assert_http_json(503, &code);
    }
    let shed = shed.unwrap_or_else(|| panic!("no check was shed: {answers:?}"));
    assert_eq!(shed.header("retry-after"), Some("1"), "{shed:?}");
}

/// An HTTP/2 answer, read whole.
async fn h2_reply(response: h2::client::ResponseFuture) -> Reply {
    let answer = tokio::time::timeout(ANSWER_WITHIN, response)
        .await
        .expect("an answer in time")
        .expect("an answer");
    let (parts, mut body) = answer.into_parts();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        bytes.extend_from_slice(&chunk.expect("the body"));
    }
    Reply {
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

// ---------------------------------------------------------------------------
// Request smuggling

/// Hostile requests, each with a `/v1/authorize` carrying `secret`
/// smuggled where a server reading the framing another way would take it
/// for a request of its own; and the first answer each must get.
fn smuggling(secret: &str) -> Vec<(&'static str, Vec<u8>, u16)> {
    let smuggled = authorize(secret);
    let s = String::from_utf8(smuggled.clone()).unwrap();
    let len = smuggled.len();
    let post = "POST /v1/authorize HTTP/1.1\r\nhost: vilvik\r\n";
    let chunk = format!("{len:x}\r\n{s}\r\n0\r\n\r\n");
    let cases: Vec<(&'static str, String, u16)> = vec![
        (
            // hyper takes the chunked framing (an empty body) and closes
            // after the answer: what follows is never read.
            "CL.TE",
            format!(
                "{post}content-length: {}\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{s}",
                5 + len
            ),
            401,
        ),
        (
            "TE.CL",
            format!("{post}content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n{chunk}"),
            401,
        ),
        (
            "CL.TE, bare LF line ends",
            format!(
                "POST /v1/authorize HTTP/1.1\nhost: vilvik\ncontent-length: {}\ntransfer-encoding: chunked\n\n0\r\n\r\n{s}",
                5 + len
            ),
            401,
        ),
        (
            "TE.TE: CHUNKED in capitals",
            format!(
                "{post}content-length: {}\r\ntransfer-encoding: CHUNKED\r\n\r\n0\r\n\r\n{s}",
                5 + len
            ),
            401,
        ),
        (
            "TE.TE: xchunked",
            format!("{post}content-length: {len}\r\ntransfer-encoding: xchunked\r\n\r\n{s}"),
            400,
        ),
        (
            "TE.TE: chunked, then identity",
            format!(
                "{post}content-length: {len}\r\ntransfer-encoding: chunked\r\ntransfer-encoding: identity\r\n\r\n{s}"
            ),
            400,
        ),
        (
            "TE.TE: chunked, identity",
            format!(
                "{post}content-length: {len}\r\ntransfer-encoding: chunked, identity\r\n\r\n{s}"
            ),
            400,
        ),
        (
            "TE.TE: a space before the colon",
            format!("{post}content-length: {len}\r\ntransfer-encoding : chunked\r\n\r\n{s}"),
            400,
        ),
        (
            "TE.TE: folded onto a second line",
            format!("{post}content-length: {len}\r\ntransfer-encoding:\r\n chunked\r\n\r\n{s}"),
            400,
        ),
        (
            "TE.TE: a vertical tab before chunked",
            format!("{post}content-length: {len}\r\ntransfer-encoding:\x0bchunked\r\n\r\n{s}"),
            400,
        ),
        (
            "TE.0: bare LF after the last chunk",
            format!("{post}transfer-encoding: chunked\r\n\r\n0\n\n{s}"),
            400,
        ),
        (
            "a chunk size past 64 bits",
            format!("{post}transfer-encoding: chunked\r\n\r\nfffffffffffffffffff\r\n{s}"),
            400,
        ),
        (
            "two different content-lengths",
            format!("{post}content-length: 0\r\ncontent-length: {len}\r\n\r\n{s}"),
            400,
        ),
        (
            "a content-length list",
            format!("{post}content-length: 0, {len}\r\n\r\n{s}"),
            400,
        ),
        (
            "a signed content-length",
            format!("{post}content-length: +{len}\r\n\r\n{s}"),
            400,
        ),
        (
            "transfer-encoding in HTTP/1.0",
            format!(
                "POST /v1/authorize HTTP/1.0\r\nhost: vilvik\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{s}"
            ),
            400,
        ),
    ];
    cases
        .into_iter()
        .map(|(name, bytes, status)| (name, bytes.into_bytes(), status))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_requests_are_refused_or_cut_off_and_never_answered() {
    let (app, secret) = app_with_a_valid_key(|_| {}).await;
    for (name, attack, status) in smuggling(&secret) {
        let exchanged = exchange(app.verify_addr, &attack).await;
        let statuses: Vec<u16> = exchanged.replies.iter().map(|r| r.status).collect();
        eprintln!(
            "{name}: answers {statuses:?}, closed after the first: {}",
            exchanged.closed_after_first
        );
        assert!(
            !exchanged.answered_a_smuggled_request(),
            "{name}: the smuggled request was answered: {exchanged:?}"
        );
        assert_eq!(exchanged.first().status, status, "{name}: {exchanged:?}");
        // One answer, and the connection closed: nothing after the
        // refused framing is read as a request.
        assert!(exchanged.closed_after_first, "{name}: {exchanged:?}");
        assert_eq!(exchanged.replies.len(), 1, "{name}: {exchanged:?}");
        assert_no_secret(&secret, name, &exchanged.received);
    }
}

// ---------------------------------------------------------------------------
// No secret echoed, in answers or in the log

fn assert_no_secret(secret: &str, what: &str, said: &[u8]) {
    let said = String::from_utf8_lossy(said);
    let (_, secret_part) = secret.rsplit_once('_').expect("a key");
    assert!(
        !said.contains(secret) && !said.contains(secret_part),
        "{what} holds the secret: {said}"
    );
}

/// Requests that carry `secret` where an error message might repeat it.
fn echo_bait(secret: &str) -> Vec<Vec<u8>> {
    let json = [("content-type", "application/json")];
    let verify = |body: String| request("POST", "/v1/keys:verify", &json, body.as_bytes());
    vec![
        request("GET", &format!("/v1/keys/{secret}"), &[], b""),
        request("GET", &format!("/v1/authorize/{secret}"), &[], b""),
        request(
            "GET",
            &format!("/v1/authorize?scope={secret}"),
            &[("x-api-key", secret)],
            b"",
        ),
        request(
            "GET",
            "/v1/authorize",
            &[("x-api-key", secret), ("x-vilvik-required-scopes", secret)],
            b"",
        ),
        request(
            "GET",
            "/v1/authorize",
            &[("x-api-key", &format!("{secret}x"))],
            b"",
        ),
        verify(format!(
            r#"{{"key":"{secret}","requiredScopes":["{secret}"]}}"#
        )),
        verify(format!(r#"{{"key":"{secret}","clientIp":"{secret}"}}"#)),
        verify(format!(r#"{{"{secret}":"{secret}"}}"#)),
        verify(format!(r#"{{"key":"{secret}""#)),
        verify(format!(r#"{{"key":["{secret}"]}}"#)),
        request("POST", "/v1/keys:verify", &[], secret.as_bytes()),
        request(
            "GET",
            "/v1/authorize",
            &[("content-type", "application/grpc"), ("x-api-key", secret)],
            secret.as_bytes(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_and_no_log_line_of_the_binary_holds_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreSettings::sqlite(dir.path().join("keys.db"));
    binary::migrate(store.env());
    let (secret, _) = binary::bootstrap(store.env(), "ACME");
    let mut server = ServedBinary::serve()
        .envs(store.env())
        .env("RUST_LOG", "trace")
        .start()
        .await;
    let addr = server.verify_addr();
    // The key works over HTTP/1.1 before the attacks.
    let check = exchange(addr, &authorize(&secret)).await;
    assert_eq!(check.first().status, 200, "{check:?}");

    let mut attacks: Vec<Vec<u8>> = echo_bait(&secret);
    attacks.extend(smuggling(&secret).into_iter().map(|(_, bytes, _)| bytes));
    let big = format!(r#"{{"key":"{secret}","pad":"{}"}}"#, "p".repeat(70 * 1024));
    attacks.push(request(
        "POST",
        "/v1/keys:verify",
        &[("content-type", "application/json")],
        big.as_bytes(),
    ));
    attacks.push(request(
        "GET",
        "/v1/authorize",
        &[("x-api-key", &secret), ("x-filler", &"f".repeat(20 * 1024))],
        b"",
    ));
    let mut answers = 0;
    for attack in &attacks {
        let exchanged = exchange(addr, attack).await;
        answers += exchanged.replies.len();
        assert_no_secret(&secret, "an answer", &exchanged.received);
    }
    assert!(answers >= attacks.len(), "too few answers: {answers}");

    server.sigterm();
    server.wait_for_exit(Duration::from_secs(20)).await;
    let log = server.log();
    assert!(
        log.lines().count() > attacks.len(),
        "the trace log is too short to judge: {log}"
    );
    assert_no_secret(&secret, "the server's log", log.as_bytes());
}

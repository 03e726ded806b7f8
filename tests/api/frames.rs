//! HTTP/2 control-frame floods, over raw HTTP/2 on loopback: connections
//! that send SETTINGS, PING or WINDOW_UPDATE frames as fast as they can
//! (and no request) get a GOAWAY with ENHANCE_YOUR_CALM and are closed,
//! while a well-behaved client's verifies keep being answered. The slow
//! variant (`#[ignore]`d, run by `.ci/run` with `--ignored frames::`)
//! measures the well-behaved client's latency with and without 4 attackers
//! that flood for 10 s, each on a new connection every second.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use vilvik_keys::proto::VerifyCode;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys_test_support::requests::verify;

use crate::connections::app_with_a_valid_key;
use vilvik_keys_test_support::TestApp;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const GOAWAY: u8 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The control frame one attacker repeats.
#[derive(Debug, Clone, Copy)]
enum Flood {
    Settings,
    Ping,
    WindowUpdate,
}

impl Flood {
    /// One frame.
    fn frame(self) -> Vec<u8> {
        match self {
            // An empty SETTINGS: the server must acknowledge each one.
            Flood::Settings => vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0],
            // A PING: the server must answer each one.
            Flood::Ping => {
                let mut frame = vec![0, 0, 8, 0x6, 0, 0, 0, 0, 0];
                frame.extend_from_slice(b"flooding");
                frame
            }
            // The connection's window, raised by 1 (never past its limit
            // within this test's counts).
            Flood::WindowUpdate => vec![0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        }
    }
}

/// What an attacker's connection saw.
#[derive(Debug, Default)]
struct Outcome {
    frames_sent: usize,
    /// The error code of the server's GOAWAY, if one came.
    goaway: Option<u32>,
    /// The server closed the connection (end of stream or reset).
    closed: bool,
    /// From the first frame sent to the close.
    took: Duration,
}

/// Reads the server's frames until it closes the connection or `until`;
/// the code of the GOAWAY it sent, if any, and whether it closed.
async fn read_server(
    mut read: tokio::net::tcp::OwnedReadHalf,
    until: Instant,
) -> (Option<u32>, bool) {
    let mut goaway = None;
    let mut bytes = Vec::new();
    let mut chunk = vec![0; 64 * 1024];
    loop {
        let n = match tokio::time::timeout_at(until, read.read(&mut chunk)).await {
            Err(_) => return (goaway, false),
            Ok(Ok(0) | Err(_)) => return (goaway, true),
            Ok(Ok(n)) => n,
        };
        bytes.extend_from_slice(&chunk[..n]);
        // Whole frames only; the rest waits for the next read.
        let mut at = 0;
        while bytes.len() - at >= 9 {
            let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
            if bytes.len() - at < 9 + len {
                break;
            }
            if bytes[at + 3] == GOAWAY && len >= 8 {
                let code = &bytes[at + 13..at + 17];
                goaway = Some(u32::from_be_bytes(code.try_into().unwrap()));
            }
            at += 9 + len;
        }
        bytes.drain(..at);
    }
}

/// One connection to `addr` sending `flood` frames, in batches, until the
/// server closes it, `max_frames` are sent, or `until`.
async fn flood(addr: SocketAddr, flood: Flood, max_frames: usize, until: Instant) -> Outcome {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (read, mut write) = tcp.into_split();
    let started = Instant::now();
    let reader = tokio::spawn(read_server(read, until + Duration::from_secs(5)));
    let mut hello = PREFACE.to_vec();
    hello.extend_from_slice(&Flood::Settings.frame());
    write.write_all(&hello).await.unwrap();
    let batch: Vec<u8> = flood.frame().repeat(100);
    let mut outcome = Outcome::default();
    while outcome.frames_sent < max_frames && Instant::now() < until && !reader.is_finished() {
        if write.write_all(&batch).await.is_err() {
            break;
        }
        outcome.frames_sent += 100;
        tokio::task::yield_now().await;
    }
    // Done sending: only the server's side is waited for.
    let (goaway, closed) = reader.await.unwrap();
    outcome.goaway = goaway;
    outcome.closed = closed;
    outcome.took = started.elapsed();
    drop(write);
    outcome
}

/// Verifies of `secret` one after another on `client` until `until`: the
/// time each VALID answer took, and the answers that were not VALID.
async fn verifies(
    mut client: KeyVerifyClient<tonic::transport::Channel>,
    secret: String,
    until: Instant,
) -> (Vec<Duration>, Vec<String>) {
    let (mut took, mut failed) = (Vec::new(), Vec::new());
    while Instant::now() < until {
        let started = Instant::now();
        match client.verify_key(verify(&secret, &[])).await {
            Ok(answer) if answer.get_ref().code() == VerifyCode::Valid => {
                took.push(started.elapsed());
            }
            other => failed.push(format!("{other:?}")),
        }
    }
    (took, failed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_frame_floods_get_goaway_enhance_your_calm_and_are_closed() {
    let (app, secret) = app_with_a_valid_key(|_| {}).await;
    let until = Instant::now() + Duration::from_secs(3);
    let legit = tokio::spawn(verifies(app.verify.clone(), secret.clone(), until));

    let mut attackers = JoinSet::new();
    let floods = [
        (app.verify_addr, Flood::Settings),
        (app.verify_addr, Flood::Ping),
        (app.verify_addr, Flood::WindowUpdate),
        // Every listener is held to the same rule.
        (app.admin_addr, Flood::Ping),
    ];
    for (addr, kind) in floods {
        attackers.spawn(async move { (kind, flood(addr, kind, 1_000_000, until).await) });
    }
    while let Some(joined) = attackers.join_next().await {
        let (kind, outcome) = joined.unwrap();
        eprintln!("{kind:?} flood: {outcome:?}");
        assert_eq!(
            outcome.goaway,
            Some(ENHANCE_YOUR_CALM),
            "{kind:?} flood: no GOAWAY ENHANCE_YOUR_CALM: {outcome:?}"
        );
        assert!(outcome.closed, "{kind:?} flood: not closed: {outcome:?}");
    }

    let (took, failed) = legit.await.unwrap();
    eprintln!(
        "well-behaved client: {} VALID, failed: {failed:?}",
        took.len()
    );
    assert!(failed.is_empty(), "the well-behaved client saw {failed:?}");
    assert!(took.len() >= 20, "only {} verifies answered", took.len());
    // A new client still gets in after the floods.
    let mut app = app;
    assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Valid);
}

/// Latency of a well-behaved client's verifies (p50, p99), their count and
/// the attackers' connections, with `attackers` flooding for `attack`, each
/// on a new connection every second once its last was closed (none when
/// `attackers` is 0).
async fn latency_under(
    app: &TestApp,
    secret: &str,
    attackers: usize,
    attack: Duration,
) -> (Duration, Duration, usize, usize) {
    let until = Instant::now() + attack;
    let legit = tokio::spawn(verifies(app.verify.clone(), secret.to_owned(), until));
    let mut floods = JoinSet::new();
    for i in 0..attackers {
        let addr = app.verify_addr;
        let kind = [Flood::Settings, Flood::Ping, Flood::WindowUpdate][i % 3];
        floods.spawn(async move {
            let mut connections = 0;
            while Instant::now() < until {
                let opened = Instant::now();
                let outcome = flood(addr, kind, 1_000_000, until).await;
                connections += 1;
                if !outcome.closed {
                    break;
                }
                // One flooding connection a second from each attacker: a
                // client reconnecting faster is a connection flood, which
                // the connection limits answer.
                tokio::time::sleep_until(opened + Duration::from_secs(1)).await;
            }
            connections
        });
    }
    let mut connections = 0;
    while let Some(n) = floods.join_next().await {
        connections += n.unwrap();
    }
    let (mut took, failed) = legit.await.unwrap();
    assert!(failed.is_empty(), "the well-behaved client saw {failed:?}");
    took.sort();
    (
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        took.len(),
        connections,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow (about 25 s): 4 connections flooding for 10 s; run by .ci/run"]
async fn a_well_behaved_client_keeps_its_latency_under_4_flooding_connections() {
    let (app, secret) = app_with_a_valid_key(|_| {}).await;
    let (p50, p99, n, _) = latency_under(&app, &secret, 0, Duration::from_secs(5)).await;
    eprintln!("unloaded: {n} verifies, p50 {p50:?}, p99 {p99:?}");
    let (fp50, fp99, fn_, conns) = latency_under(&app, &secret, 4, Duration::from_secs(10)).await;
    eprintln!(
        "4 flooding connections at a time ({conns} opened in all): {fn_} verifies, p50 {fp50:?}, p99 {fp99:?}"
    );
    assert!(
        fp50 <= p50 * 3,
        "p50 under flood {fp50:?} is more than 3x the unloaded {p50:?}"
    );
}

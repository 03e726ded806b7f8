//! Several nodes on one database: what one admin node changes, every verify
//! node honours, at once or within the change feed's delay; and what
//! verifies cost the database, counted on the wire.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vilvik_keys::proto::{self, VerifyCode};
use vilvik_keys_test_support::requests::verify;
use vilvik_keys_test_support::{
    Backend, TestApp, VerifyNode, bearer, eventually, spawn_app, spawn_app_with, test_server_addr,
    through_proxy,
};

crate::on_both_backends!(revocation_reaches_every_verify_node);

async fn revocation_reaches_every_verify_node(mut app: TestApp) {
    let mut nodes = vec![
        app.spawn_verify_node(|_| {}).await,
        app.spawn_verify_node(|_| {}).await,
    ];
    // Each round revokes what it creates, so the free tier's cap never binds.
    for round in 0..5 {
        let created = app
            .create_key(&format!("service-{round}"), &["a:b"])
            .await
            .unwrap();
        let secret = created.secret;
        // Cached everywhere first.
        assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Valid);
        for node in &mut nodes {
            assert_eq!(node.wait_until_known(&secret).await, VerifyCode::Valid);
        }
        app.revoke_key(&created.key.unwrap().key_id).await.unwrap();
        let revoked_at = Instant::now();
        // The node that served the revocation never accepts the key again.
        assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Revoked);
        for node in &nodes {
            wait_until_revoked(node, &secret, Duration::from_secs(2)).await;
        }
        assert!(revoked_at.elapsed() < Duration::from_secs(4));
    }
}

/// Waits until `node` answers REVOKED for `secret` (it may answer VALID
/// meanwhile, nothing else); fails when that takes `within` or longer.
async fn wait_until_revoked(node: &VerifyNode, secret: &str, within: Duration) {
    let what = format!("node {} answers REVOKED for the revoked key", node.addr);
    node.wait_for_code(secret, within, &what, |code| match code {
        VerifyCode::Revoked => true,
        VerifyCode::Valid => false,
        other => panic!("unexpected answer {other:?}"),
    })
    .await;
}

/// A notification sent while a node's listener was disconnected is caught
/// up when it reconnects, without waiting for the consistency check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_missed_while_disconnected_is_caught_up_on_reconnect() {
    let Some(mut app) = spawn_app(Backend::Postgres).await else {
        return;
    };
    let mut node = app
        .spawn_verify_node(|c| c.consistency_check_interval = Duration::from_secs(3600))
        .await;
    let created = app.create_key("ci-runner", &["a:b"]).await.unwrap();
    assert_eq!(
        node.wait_until_known(&created.secret).await,
        VerifyCode::Valid
    );

    let client = app.postgres_client().await;
    let killed = client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'vilvik-keys-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert!(
        killed >= 2,
        "expected both nodes' listeners, found {killed}"
    );
    // Revoke while the listeners are gone: nobody hears this notification.
    app.revoke_key(&created.key.unwrap().key_id).await.unwrap();
    wait_until_revoked(&node, &created.secret, Duration::from_secs(3)).await;
}

/// Verifies answered from memory cost the database nothing but the batched
/// usage flush: transactions counted on the wire between the node and
/// Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifies_cost_about_one_statement_per_flush_interval() {
    let Some((mut app, count)) = counted_app(|c| {
        c.usage_flush_interval = Duration::from_millis(500);
    })
    .await
    else {
        return;
    };
    let created = app.create_key("hot-key", &["a:b"]).await.unwrap();
    assert_eq!(
        app.verify_code(&created.secret, &[]).await,
        VerifyCode::Valid
    );
    count.settled().await;
    // Long enough for several hundred verifies and a few flushes; every bound
    // below scales with the time actually taken.
    let window = Duration::from_secs(1);

    // Idle: the follower's consistency checks and the pool's own queries,
    // a rate measured over the window, so the window is waited out whole.
    let before = count.transactions();
    tokio::time::sleep(window).await;
    let idle = count.transactions() - before;

    // The same window full of verifies of a cached key.
    let before = count.transactions();
    let started = Instant::now();
    let mut verifies = 0;
    while started.elapsed() < window {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let mut client = app.verify.clone();
            let request = verify(&created.secret, &[]);
            batch
                .spawn(async move { client.verify_key(request).await.unwrap().into_inner().valid });
        }
        while let Some(valid) = batch.join_next().await {
            assert!(valid.unwrap());
            verifies += 1;
        }
    }
    let busy = count.transactions() - before;
    eprintln!("transactions: idle {idle}, busy {busy} for {verifies} verifies");

    // What verifies add is the usage flush, once per 0.5 s interval (with
    // the pool's check of the connection, two transactions), plus slack.
    let flushes = (started.elapsed().as_secs_f64() + 1.2) / 0.5;
    let allowed = idle as f64 + 2.0 * flushes + 5.0;
    // Enough that uncached verifies would show as hundreds of statements;
    // a debug build on a loaded 2-core machine manages 700-1,000 a second.
    assert!(verifies > 500, "only {verifies} verifies ran");
    assert!(
        (busy as f64) <= allowed,
        "{busy} transactions for {verifies} verifies (idle: {idle}); expected at most {allowed}"
    );
    let key = app.get_key(&created.key.unwrap().key_id).await;
    assert!(key.last_used_at.is_some());
}

/// Anyone can make well-formed keys (the checksum is public): one nobody
/// has is NOT_FOUND from the node's set of known prefixes, on the verify
/// listener and as an admin bearer token alike, with no database access.
/// Transactions counted on the wire between the node and Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_nobody_has_cost_no_database_access() {
    let Some((app, count)) = counted_app(|c| {
        // Nothing else of the node's own may touch the database meanwhile.
        c.consistency_check_interval = Duration::from_secs(3600);
        c.usage_flush_interval = Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    const ATTEMPTS: usize = 500;
    count.settled().await;
    let before = count.transactions();
    for _ in 0..ATTEMPTS {
        let stranger =
            vilvik_keys_domain::GeneratedKey::generate(&vilvik_keys_domain::Pepper::generate());
        let secret = stranger.expose_secret();
        let answer = app
            .verify
            .clone()
            .verify_key(verify(secret, &[]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.code(), VerifyCode::NotFound);
        let refused = app
            .admin
            .clone()
            .list_keys(bearer(proto::ListKeysRequest::default(), secret))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }
    // The listener's heartbeat may add one or two.
    let spent = count.transactions() - before;
    eprintln!("transactions for {ATTEMPTS} unknown keys on each listener: {spent}");
    assert!(
        spent <= 4,
        "{spent} transactions for {ATTEMPTS} unknown keys"
    );
}

/// An app on Postgres whose every session to the database goes through a
/// [`TransactionCount`]; `None` when no test database is configured.
async fn counted_app(
    configure: impl FnOnce(&mut vilvik_keys::config::Config),
) -> Option<(TestApp, TransactionCount)> {
    use secrecy::ExposeSecret;
    let Some(server) = test_server_addr() else {
        // Skips, or fails under VILVIK_KEYS_REQUIRE_POSTGRES=1, as every Postgres test.
        assert!(spawn_app(Backend::Postgres).await.is_none());
        return None;
    };
    let count = TransactionCount::start(server).await;
    let proxy = count.addr;
    let app = spawn_app_with(Backend::Postgres, move |config| {
        configure(config);
        let url = config.database_url.as_ref().unwrap().expose_secret();
        config.database_url = Some(through_proxy(url, proxy).into());
    })
    .await?;
    Some((app, count))
}

/// A TCP proxy in front of Postgres that counts the transactions its
/// clients end, as the server reports each end (ReadyForQuery, idle):
/// exact and at once, where Postgres's own statistics lag behind by up to
/// a second or more.
struct TransactionCount {
    addr: SocketAddr,
    ended: Arc<AtomicU64>,
    /// Queries sent and not yet answered, on every connection.
    pending: Arc<AtomicI64>,
    /// What of the node's start-up work was sent.
    started: Arc<StartUp>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for TransactionCount {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl TransactionCount {
    async fn start(server: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ended, pending) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicI64::new(0)));
        let started = Arc::new(StartUp::default());
        let counts = (ended.clone(), pending.clone(), started.clone());
        let acceptor = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(server).await else {
                    continue;
                };
                let (ended, pending, started) = counts.clone();
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = upstream.into_split();
                // The startup message's answer ends with a ReadyForQuery too.
                pending.fetch_add(1, Ordering::SeqCst);
                let sent = pending.clone();
                // This connection's prepared statements, by name.
                let mut prepared = HashMap::new();
                tokio::spawn(relay(client_read, server_write, true, move |kind, body| {
                    // A simple query, or the Sync that ends an extended one.
                    if matches!(kind, b'Q' | b'S') {
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut fields = body.split(|&b| b == 0);
                    let statement = match kind {
                        b'Q' => fields.next(),
                        b'P' => {
                            let (name, text) = (fields.next(), fields.next());
                            prepared.insert(
                                name.unwrap_or_default().to_vec(),
                                text.unwrap_or_default().to_vec(),
                            );
                            text
                        }
                        b'B' => fields
                            .nth(1)
                            .and_then(|name| prepared.get(name).map(Vec::as_slice)),
                        _ => None,
                    };
                    if let Some(statement) = statement {
                        started.saw(statement);
                    }
                }));
                let mut startup = true;
                tokio::spawn(relay(
                    server_read,
                    client_write,
                    false,
                    move |kind, body| {
                        if kind == b'Z' {
                            pending.fetch_sub(1, Ordering::SeqCst);
                            if body.first() == Some(&b'I') && !std::mem::take(&mut startup) {
                                ended.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    },
                ));
            }
        });
        Self {
            addr,
            ended,
            pending,
            started,
            acceptor,
        }
    }

    /// Transactions ended so far.
    fn transactions(&self) -> u64 {
        self.ended.load(Ordering::SeqCst)
    }

    /// Waits until the node's start-up queries are done: the admin
    /// node's prune of its history and the change follower's first check
    /// after it subscribed were sent, no query is waiting for its answer,
    /// and none ended between two polls.
    async fn settled(&self) {
        let mut last = u64::MAX;
        eventually(Duration::from_secs(10), "the node's queries settle", || {
            let (now, idle) = (
                self.transactions(),
                self.pending.load(Ordering::SeqCst) == 0,
            );
            let settled = self.started.done() && idle && now == last;
            last = now;
            std::future::ready(settled)
        })
        .await;
    }
}

/// The work a node starts with that reaches the database, seen in the
/// statements it sends: the admin node's prune of its history (request ids
/// are pruned last), and the change follower's subscription (`LISTEN`)
/// followed by its first check of the change log's end.
#[derive(Debug, Default)]
struct StartUp {
    pruned: AtomicBool,
    subscribed: AtomicBool,
    checked: AtomicBool,
}

impl StartUp {
    fn saw(&self, statement: &[u8]) {
        let has = |needle: &[u8]| statement.windows(needle.len()).any(|w| w == needle);
        if has(b"DELETE FROM requests WHERE expires_at") {
            self.pruned.store(true, Ordering::SeqCst);
        }
        if has(b"LISTEN ") {
            self.subscribed.store(true, Ordering::SeqCst);
        } else if has(b"MAX(seq)") && self.subscribed.load(Ordering::SeqCst) {
            self.checked.store(true, Ordering::SeqCst);
        }
    }

    fn done(&self) -> bool {
        self.pruned.load(Ordering::SeqCst) && self.checked.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to`, calling `seen` with the type and body of each
/// protocol message that passes; the client's first message (the startup
/// message) has no type byte.
async fn relay(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    untyped_first: bool,
    mut seen: impl FnMut(u8, &[u8]),
) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut untyped = untyped_first;
    loop {
        let Ok(read @ 1..) = from.read(&mut chunk).await else {
            return;
        };
        buffer.extend_from_slice(&chunk[..read]);
        // Counted before they pass, so that no answer is seen before its query.
        loop {
            let header = if untyped { 4 } else { 5 };
            let Some(length) = buffer.get(header - 4..header) else {
                break;
            };
            let length = u32::from_be_bytes(length.try_into().unwrap()) as usize;
            let total = header - 4 + length;
            if buffer.len() < total {
                break;
            }
            if !untyped {
                seen(buffer[0], &buffer[header..total]);
            }
            untyped = false;
            buffer.drain(..total);
        }
        if to.write_all(&chunk[..read]).await.is_err() {
            return;
        }
    }
}

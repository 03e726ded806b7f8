//! Several nodes on one database: what one admin node changes, every verify
//! node honours, at once or within the change feed's delay.

use std::time::{Duration, Instant};

use vilvik_keys::proto::{self, VerifyCode};
use vilvik_keys_test_db::eventually;

use crate::helpers::{Backend, TestApp, VerifyNode, spawn_app, spawn_app_with};

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
        let request = app.authed(proto::RevokeKeyRequest {
            key_id: created.key.unwrap().key_id,
            reason: String::new(),
            ..Default::default()
        });
        app.admin.revoke_key(request).await.unwrap();
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
    eventually(within, &what, || {
        let mut client = node.verify.clone();
        let key = secret.to_owned();
        async move {
            let code = client
                .verify_key(proto::VerifyKeyRequest {
                    key,
                    ..Default::default()
                })
                .await
                .expect("VerifyKey answers OK")
                .into_inner()
                .code();
            match code {
                VerifyCode::Revoked => true,
                VerifyCode::Valid => false,
                other => panic!("unexpected answer {other:?}"),
            }
        }
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
    let request = app.authed(proto::RevokeKeyRequest {
        key_id: created.key.unwrap().key_id,
        reason: String::new(),
        ..Default::default()
    });
    app.admin.revoke_key(request).await.unwrap();
    wait_until_revoked(&node, &created.secret, Duration::from_secs(3)).await;
}

/// Verifies answered from memory cost the database nothing but the batched
/// usage flush: counted with Postgres's own transaction counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifies_cost_about_one_statement_per_flush_interval() {
    let Some(mut app) = spawn_app_with(Backend::Postgres, |c| {
        c.usage_flush_interval = Duration::from_millis(500);
    })
    .await
    else {
        return;
    };
    let created = app.create_key("hot-key", &["a:b"]).await.unwrap();
    let client = app.postgres_client().await;
    let transactions = || transactions(&client);
    assert_eq!(
        app.verify_code(&created.secret, &[]).await,
        VerifyCode::Valid
    );
    // Long enough for several hundred verifies and a few flushes; every bound
    // below scales with the time actually taken.
    let window = Duration::from_secs(1);

    // Idle: the follower's consistency checks and the pool's own queries.
    let before = transactions().await;
    tokio::time::sleep(window).await;
    let idle = transactions().await - before;

    // The same window full of verifies of a cached key.
    let before = transactions().await;
    let started = Instant::now();
    let mut verifies = 0;
    while started.elapsed() < window {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let mut client = app.verify.clone();
            let key = created.secret.clone();
            batch.spawn(async move {
                client
                    .verify_key(proto::VerifyKeyRequest {
                        key,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .valid
            });
        }
        while let Some(valid) = batch.join_next().await {
            assert!(valid.unwrap());
            verifies += 1;
        }
    }
    let busy = transactions().await - before;
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
/// Counted with Postgres's own transaction counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_nobody_has_cost_no_database_access() {
    let Some(app) = spawn_app_with(Backend::Postgres, |c| {
        // Nothing else of the node's own may touch the database meanwhile.
        c.consistency_check_interval = Duration::from_secs(3600);
        c.usage_flush_interval = Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    let client = app.postgres_client().await;
    let transactions = || transactions(&client);
    const ATTEMPTS: usize = 500;
    let before = transactions().await;
    for _ in 0..ATTEMPTS {
        let stranger =
            vilvik_keys_domain::GeneratedKey::generate(&vilvik_keys_domain::Pepper::generate());
        let secret = stranger.expose_secret();
        let answer = app
            .verify
            .clone()
            .verify_key(proto::VerifyKeyRequest {
                key: secret.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.code(), VerifyCode::NotFound);
        let refused = app
            .admin
            .clone()
            .list_keys(crate::helpers::with_bearer(
                proto::ListKeysRequest::default(),
                secret,
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }
    // Our own counter query is one transaction; the listener's heartbeat
    // may add one or two.
    let spent = transactions().await - before;
    eprintln!("transactions for {ATTEMPTS} unknown keys on each listener: {spent}");
    assert!(
        spent <= 4,
        "{spent} transactions for {ATTEMPTS} unknown keys"
    );
}

/// The database's committed and rolled-back transactions so far, as
/// Postgres counts them; waits first, since other sessions report their
/// counters at most once a second.
async fn transactions(client: &tokio_postgres::Client) -> i64 {
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    client
        .query_one(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
}

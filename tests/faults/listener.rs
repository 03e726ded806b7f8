//! The change listener's session terminated (`pg_terminate_backend` of
//! every `vilvik-keys-listener` session) while the nodes' pooled
//! connections stay open: once with the database refusing new connections
//! (`ALLOW_CONNECTIONS false`), so no listener can come back, and once
//! with reconnection allowed. Either way the nodes can still read the
//! change log through their pools, so a revoke must reach every verify
//! node within 1 s, or within 200 ms when the listener can reconnect.

use std::time::{Duration, Instant};

use crate::harness::{
    Answer, Faults, Findings, STALENESS_BOUND, STORE_DEADLINE, Watch, secs, watch,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_listener_gone_and_connections_refused_a_revoke_reaches_every_node_within_1s() {
    revoke_without_listener(Reconnect::Refused, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_listener_killed_a_revoke_reaches_every_node_within_200ms() {
    revoke_without_listener(Reconnect::Allowed, Duration::from_millis(200)).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reconnect {
    Refused,
    Allowed,
}

async fn revoke_without_listener(reconnect: Reconnect, within: Duration) {
    let scenario = match reconnect {
        Reconnect::Refused => "listener killed, connections refused",
        Reconnect::Allowed => "listener killed",
    };
    let Some((faults, keys)) = Faults::start(&["revoked", "bystander"]).await else {
        return;
    };
    let [revoked, bystander] = &keys[..] else {
        unreachable!("two keys asked for")
    };

    let superuser = faults.superuser().await;
    let database = faults.database();
    let killed_at = Instant::now();
    if reconnect == Reconnect::Refused {
        superuser
            .batch_execute(&format!(
                "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false"
            ))
            .await
            .unwrap();
    }
    let killed = superuser
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'vilvik-keys-listener'",
            &[&database],
        )
        .await
        .unwrap()
        .len();
    // The admin node follows the log too.
    assert!(
        killed >= 3,
        "expected the three nodes' listeners, found {killed}"
    );
    // The admin node's pooled connections are still open.
    faults.revoke(revoked).await;
    let acked = Instant::now();
    eprintln!(
        "[{scenario}] {killed} listeners terminated; revoke acknowledged {} s later",
        secs(acked - killed_at)
    );

    // Long enough to see when today's code gets there, if late.
    let observe = STALENESS_BOUND + STORE_DEADLINE + Duration::from_secs(1);
    let timelines = watch(
        scenario,
        vec![
            Watch::new(&faults.direct, revoked, "revoked key"),
            Watch::new(&faults.cut_off, revoked, "revoked key"),
        ],
        acked,
        observe,
        |answer| answer == Answer::Revoked,
    )
    .await;

    let mut findings = Findings::default();
    for timeline in &timelines {
        let label = &timeline.label;
        match timeline.first(Answer::Revoked) {
            Some(revoked) => {
                eprintln!(
                    "[{scenario}] {label}: REVOKED {} s after the acknowledgement",
                    secs(revoked.received)
                );
                findings.check(revoked.received <= within, || {
                    format!(
                        "{label}: rejected the revoked key {} s after the acknowledgement \
                         (at most {} s)",
                        secs(revoked.received),
                        secs(within)
                    )
                });
            }
            None => findings.check(false, || {
                format!("{label}: never answered REVOKED within {} s", secs(observe))
            }),
        }
        findings.only(
            timeline,
            &[Answer::Valid, Answer::Revoked],
            "VALID or REVOKED",
        );
    }

    // Cached keys keep verifying: the pools still reach the database.
    let cached = watch(
        scenario,
        vec![
            Watch::new(&faults.direct, bystander, "cached key"),
            Watch::new(&faults.cut_off, bystander, "cached key"),
        ],
        Instant::now(),
        Duration::from_millis(500),
        |_| false,
    )
    .await;
    for timeline in &cached {
        findings.only(timeline, &[Answer::Valid], "VALID (the key is not revoked)");
    }
    findings.assert_none(scenario);
}

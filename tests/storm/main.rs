//! Crash storms: concurrent writers (CreateKey and RotateKey with request
//! ids, UpdateKey with and without etags, RevokeKey) against a real
//! `vilvik-keys serve` process while a fault strikes at random moments:
//!
//! - the server is `kill -9`ed and restarted on the same ports and store
//!   (SQLite file, and a Postgres cluster of the test's own);
//! - the Postgres cluster is stopped hard (`pg_ctl stop -m immediate`) and
//!   started again while the server keeps running.
//!
//! Each writer (`writer`) keeps a journal (`journal`) of every call: its
//! parameters, request id, and every attempt's outcome: acknowledged (OK),
//! refused (a definite status) or ambiguous (transport error, UNAVAILABLE,
//! DEADLINE_EXCEEDED). Ambiguous creates and rotations are retried with the
//! same request id until answered; ambiguous updates and revocations are
//! read back. After the storm the test checks (`check`), with the server
//! up again: every key the store holds is one a journal knows (no orphan),
//! every key's last secret verifies (no lost secret), each key's audit
//! events match its committed changes one for one and replay to its row, a
//! call answered "nothing was changed" changed nothing, and `vilvik-keys
//! audit verify` exits 0.
//!
//! Each storm takes 10-40 s and is `#[ignore]`d in the default run;
//! `.ci/run` runs them (`cargo test --test storm -- --ignored
//! --test-threads=1`). Each prints its figures (`figures`; `--nocapture`
//! to see them); `STORM_SEED` replays a run's random choices of moments
//! and calls.

mod check;
mod figures;
mod journal;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vilvik_keys_test_db::PrivateCluster;
use vilvik_keys_test_support::{ServedBinary, StoreSettings, binary};

use crate::check::{Admin, check};
use crate::figures::Figures;
use crate::writer::Writer;

const ACCOUNT: &str = "STORM";
const SCOPE: &str = "datasets:read";
const WRITERS: usize = 6;
/// Faults per storm: at least five, so that calls of every kind are
/// caught by one.
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
    let store = StoreSettings::sqlite(dir.path().join("keys.db"));
    storm(
        "SQLite, server kill -9",
        store,
        dir,
        None,
        Fault::KillServer,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a storm of 6 faults, 10-40 s: .ci/run runs it"]
async fn postgres_survives_kill_9_storm() {
    postgres_storm("Postgres, server kill -9", Fault::KillServer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a storm of 6 faults, 10-40 s: .ci/run runs it"]
async fn postgres_hard_stop_storm() {
    postgres_storm("Postgres, cluster stop -m immediate", Fault::StopPostgres).await;
}

/// A storm on a private cluster with database `storm` (and a pepper file
/// in a temp dir); skipped when no Postgres server is installed and none
/// is required.
async fn postgres_storm(label: &str, fault: Fault) {
    // Commits acknowledged only once in the WAL: the hard stop must lose
    // none of them (with synchronous_commit off it loses the last ones,
    // and this storm reports them as lost acknowledged writes).
    let Some(cluster) = PrivateCluster::start_durable() else {
        return;
    };
    let url = cluster.create_database("storm").await;
    let dir = tempfile::tempdir().unwrap();
    // Named explicitly, the pepper file must exist; the SQLite store's
    // default (beside the file) is generated on the first start.
    let pepper = dir.path().join("pepper");
    vilvik_keys::pepper::create(&pepper).unwrap();
    let store = StoreSettings::postgres(url, &pepper);
    storm(label, store, dir, Some(cluster), fault).await;
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
    store: StoreSettings,
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

    let quiet = [("RUST_LOG", "warn")];
    binary::migrate(store.env());
    let (management_key, _) = binary::bootstrap(store.env().chain(quiet), ACCOUNT);
    let mut server = serve(&store, &dir).await;
    let admin = Admin::new(server.admin_addr(), &management_key);
    wait_ready(&mut server, &admin).await;
    // Before the storm the account holds the bootstrap's key alone.
    let before = admin.list_all_keys().await;
    assert_eq!(before.len(), 1, "{before:?}");
    let management_key_id = before[0].key_id.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|n| {
            let writer = Writer::new(n, server.admin_addr(), &management_key, rng.next());
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
                server.restart().await;
                wait_ready(&mut server, &admin).await;
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
    wait_ready(&mut server, &admin).await;

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
        server.starts(),
    );
    println!("{}", figures.table());

    let verify = server.verify_addr();
    let problems = check(&admin, verify, &management_key_id, &journals, &store).await;
    assert!(
        problems.is_empty(),
        "{label}: {} problems after the storm (seed {seed}):\n{}\nserver log (warnings, tail):\n{}",
        problems.len(),
        problems.join("\n"),
        server.warnings_tail(40)
    );
    assert!(
        figures.caught_by_a_fault() > 0,
        "{label}: no call was caught by a fault: the storm tested nothing"
    );
    drop(server);
    drop(cluster);
}

/// `vilvik-keys serve` on the store, restarted on the same ports after a
/// `kill -9`, logging to `dir/serve.log` across restarts.
async fn serve(store: &StoreSettings, dir: &tempfile::TempDir) -> ServedBinary {
    ServedBinary::serve()
        .envs(store.env())
        // Room for every writer's keys, and no rate limit in the way:
        // the storm is about faults, not quotas.
        .env("VILVIK_KEYS_FREE_TIER_LIMIT", "500")
        .env("VILVIK_KEYS_PREMIUM_TIER_LIMIT", "500")
        .env("VILVIK_KEYS_ADMIN_RATE_PER_SECOND", "100000")
        .env("VILVIK_KEYS_ADMIN_RATE_BURST", "100000")
        .env("VILVIK_KEYS_STORE_TIMEOUT_MS", "2000")
        .env("VILVIK_KEYS_CHANGE_FEED_RETRY_MS", "100")
        .log_to(dir.path().join("serve.log"))
        .start()
        .await
}

/// Waits (bounded) until an authenticated read answers OK.
async fn wait_ready(server: &mut ServedBinary, admin: &Admin) {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Some(status) = server.try_exit() {
            panic!(
                "the server exited ({status}):\n{}",
                server.warnings_tail(40)
            );
        }
        if admin.ready().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not answer within {READY_WITHIN:?}:\n{}",
            server.warnings_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
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

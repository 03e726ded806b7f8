//! A SIGTERM while the store cannot take the last usage flush: the process
//! retries until its grace period ends, then exits with code 3 saying what
//! it abandoned; if the store comes back in time, it writes the usage and
//! exits 0. The fault is real: another connection holds the SQLite file's
//! write lock (`BEGIN IMMEDIATE`), as another process's writer would.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys::proto::{CreateKeyRequest, VerifyCode, VerifyKeyRequest};
use vilvik_keys_test_db::eventually;

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

//! A Postgres cluster of a test's own, for tests that stop, freeze or cut
//! off the database: `initdb` in a temp dir, `pg_ctl start` on a free port
//! of 127.0.0.1, trust authentication for the `postgres` superuser. Dropping
//! it thaws it, stops it (`pg_ctl stop -m immediate`) and removes the dir,
//! also when the test panics. It never touches the shared server named by
//! [`URL_VAR`](crate::URL_VAR).
//!
//! The tools come from `pg_config --bindir`. `initdb` refuses to run as
//! root, so when the test runs as root every tool runs as the `postgres` OS
//! user (`runuser -u postgres --`) and the temp dir is given to that user.
//!
//! [`PrivateCluster::start_with_tls`] starts one with `ssl=on` and the
//! certificate and key a test made ([`ServerTls`]), optionally refusing
//! TCP connections without TLS (`hostssl` only in `pg_hba.conf`).

use std::fmt;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::REQUIRE_VAR;

/// The OS user the cluster runs as when the test runs as root.
const CLUSTER_OS_USER: &str = "postgres";
/// The cluster's superuser (trust authentication, no password).
pub const SUPERUSER: &str = "postgres";
/// Ports tried before giving up: another process may take the free port
/// between our probe and the server's bind.
const START_ATTEMPTS: usize = 3;
/// How long `pg_ctl` waits for the server to start or stop.
const PG_CTL_WAIT_SECS: &str = "30";

/// What a [`PrivateCluster`] started with TLS serves: its certificate
/// (PEM, the server's first, then any intermediates) and private key
/// (PEM), and whether it refuses TCP connections without TLS.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// `hostssl` lines only in `pg_hba.conf`: a plain TCP connection is
    /// rejected with "no pg_hba.conf entry ... no encryption".
    pub reject_plain: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("reject_plain", &self.reject_plain)
            .finish_non_exhaustive()
    }
}

/// `pg_hba.conf` of a cluster that refuses plain TCP: TLS on TCP, and the
/// Unix socket (where [`PrivateCluster::client`] connects) as before.
const HBA_TLS_ONLY: &str = "\
local all all trust
hostssl all all 127.0.0.1/32 trust
hostssl all all ::1/128 trust
";

/// A running Postgres cluster owned by one test.
pub struct PrivateCluster {
    bindir: PathBuf,
    /// `Some("postgres")` when the tools must run as that OS user.
    run_as: Option<&'static str>,
    data: PathBuf,
    port: u16,
    /// `-c` settings for TLS, when started with it.
    tls_options: Option<String>,
    /// `synchronous_commit=on`: see [`start_durable`](Self::start_durable).
    durable_commits: bool,
    frozen: bool,
    stopped: bool,
    /// Removed last, after the server stopped.
    dir: tempfile::TempDir,
}

impl PrivateCluster {
    /// Creates and starts a cluster, and waits until it answers.
    ///
    /// Returns `None`, saying so on stderr, only when `pg_config` is not
    /// installed and [`REQUIRE_VAR`] is not `1`; with it set a missing tool
    /// is a failure. Any other problem (initdb or the start fails) panics
    /// with the server's log.
    pub fn start() -> Option<PrivateCluster> {
        Self::start_inner(None, false)
    }

    /// [`start`](Self::start) with `synchronous_commit=on`, so that a
    /// commit the server acknowledged survives [`stop`](Self::stop) (an
    /// immediate shutdown). The other clusters run with it off, for speed:
    /// their last commits before a hard stop may be lost, acknowledged or
    /// not. `fsync` stays off here too: a stop kills processes, not the
    /// kernel, so what was written to the OS survives it.
    pub fn start_durable() -> Option<PrivateCluster> {
        Self::start_inner(None, true)
    }

    /// [`start`](Self::start) with `ssl=on`, serving `tls`: its certificate
    /// and key are written to the cluster's dir, owner-only (0600) and
    /// owned by the OS user the server runs as, and named by
    /// `ssl_cert_file` and `ssl_key_file`. With
    /// [`reject_plain`](ServerTls::reject_plain) TCP clients must use TLS.
    pub fn start_with_tls(tls: &ServerTls) -> Option<PrivateCluster> {
        Self::start_inner(Some(tls), false)
    }

    fn start_inner(tls: Option<&ServerTls>, durable_commits: bool) -> Option<PrivateCluster> {
        let Some(bindir) = pg_bindir() else {
            if std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1") {
                panic!(
                    "{REQUIRE_VAR}=1 but pg_config is not on PATH: install the Postgres server \
                     (initdb, pg_ctl) so fault tests can start a cluster of their own"
                );
            }
            eprintln!("skipped: pg_config is not on PATH, cannot start a private Postgres cluster");
            return None;
        };
        let run_as = running_as_root().then_some(CLUSTER_OS_USER);
        let dir = tempfile::Builder::new()
            .prefix("vilvik-keys-pg-")
            .tempdir()
            .expect("a temp dir for the cluster");
        if let Some(user) = run_as {
            check(
                Command::new("chown").arg(user).arg(dir.path()).output(),
                "chown the cluster's temp dir",
            );
        }
        let data = dir.path().join("data");
        let mut cluster = PrivateCluster {
            bindir,
            run_as,
            data,
            port: 0,
            tls_options: None,
            durable_commits,
            frozen: false,
            stopped: true,
            dir,
        };
        cluster.initdb();
        if let Some(tls) = tls {
            cluster.set_up_tls(tls);
        }
        for attempt in 1..=START_ATTEMPTS {
            cluster.port = free_port();
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    cluster.stopped = false;
                    return Some(cluster);
                }
                Err(problem) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "private cluster did not start on port {}: {problem}; retrying",
                        cluster.port
                    );
                }
                Err(problem) => panic!("the private Postgres cluster does not start: {problem}"),
            }
        }
        unreachable!("the loop returns or panics on its last attempt")
    }

    /// The port the server listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of `database` on this cluster, as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A connection to `database`, driven by a task on the current runtime.
    /// It goes through the cluster's Unix socket, so it works whatever
    /// the cluster demands of TCP clients (such as TLS).
    pub async fn client(&self, database: &str) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(self.dir.path())
            .port(self.port)
            .user(SUPERUSER)
            .dbname(database);
        let (client, connection) = config
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the private cluster's {database}: {e}"));
        tokio::spawn(async move {
            // Ends when the client is dropped or the cluster stops.
            let _ = connection.await;
        });
        client
    }

    /// Creates `database` (a plain identifier) and returns its URL.
    pub async fn create_database(&self, database: &str) -> String {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE \"{database}\""))
            .await
            .unwrap_or_else(|e| panic!("cannot create {database} on the private cluster: {e}"));
        self.url(database)
    }

    /// Freezes the whole cluster: SIGSTOP to the postmaster and every one
    /// of its child processes. Connections stay open and answer nothing,
    /// like a server that hangs or a host that stalls.
    pub fn freeze(&mut self) {
        let postmaster = self.postmaster_pid();
        // The postmaster first, so it forks no new child after the scan.
        signal("STOP", &[postmaster]);
        self.frozen = true;
        signal("STOP", &children_of(postmaster));
    }

    /// Undoes [`freeze`](Self::freeze): SIGCONT to every process.
    pub fn thaw(&mut self) {
        let postmaster = self.postmaster_pid();
        signal("CONT", &children_of(postmaster));
        signal("CONT", &[postmaster]);
        self.frozen = false;
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`): every
    /// connection to it breaks.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        if self.frozen {
            self.thaw();
        }
        let postmaster = read_postmaster_pid(&self.data);
        let output = self
            .pg_ctl()
            .args([
                "stop",
                "-m",
                "immediate",
                "-w",
                "-t",
                PG_CTL_WAIT_SECS,
                "-D",
            ])
            .arg(&self.data)
            .output();
        match output {
            Ok(out) if out.status.success() => {}
            other => {
                // Never leave our server running: kill the postmaster we
                // started, by its PID (its children exit with it).
                eprintln!(
                    "pg_ctl stop failed ({}); killing the postmaster",
                    describe(&other)
                );
                if let Some(pid) = postmaster {
                    signal("KILL", &[pid]);
                }
            }
        }
        // pg_ctl returns once the pid file is gone; the process may take a
        // moment longer to exit.
        if let Some(pid) = postmaster {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.stopped = true;
    }

    /// Starts the server again after [`stop`](Self::stop), on the same data
    /// dir and port, and waits until it answers on TCP. Postgres recovers
    /// from its WAL first, as after a crash. Clients must reconnect: their
    /// connections broke with the stop. Does nothing while it runs.
    ///
    /// Panics with the server's log when it does not start (for example
    /// when another process took the port meanwhile).
    pub fn start_again(&mut self) {
        if !self.stopped {
            return;
        }
        if let Err(problem) = self.pg_ctl_start() {
            panic!("the private Postgres cluster does not start again: {problem}");
        }
        self.stopped = false;
    }

    /// The PID in the data dir's `postmaster.pid`.
    pub fn postmaster_pid(&self) -> u32 {
        read_postmaster_pid(&self.data).unwrap_or_else(|| {
            panic!(
                "no postmaster.pid in {}: is the cluster running?",
                self.data.display()
            )
        })
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn tool(&self, name: &str) -> Command {
        let program = self.bindir.join(name);
        match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(program);
                command
            }
            None => Command::new(program),
        }
    }

    fn pg_ctl(&self) -> Command {
        self.tool("pg_ctl")
    }

    fn initdb(&self) {
        let output = self
            .tool("initdb")
            .args([
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--username",
                SUPERUSER,
                "-D",
            ])
            .arg(&self.data)
            .output();
        check(output, "initdb");
    }

    /// Writes `tls`'s certificate and key beside the data dir, owner-only
    /// and owned by the server's OS user (Postgres refuses a key others
    /// may read), and the `pg_hba.conf` it asks for.
    fn set_up_tls(&mut self, tls: &ServerTls) {
        let cert = self.dir.path().join("server.crt");
        let key = self.dir.path().join("server.key");
        for (path, pem) in [(&cert, &tls.cert_pem), (&key, &tls.key_pem)] {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut file| file.write_all(pem.as_bytes()))
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            if let Some(user) = self.run_as {
                check(
                    Command::new("chown").arg(user).arg(path).output(),
                    "chown the cluster's TLS files",
                );
            }
        }
        if tls.reject_plain {
            // initdb wrote it as the server's user; rewriting keeps the owner.
            let hba = self.data.join("pg_hba.conf");
            std::fs::write(&hba, HBA_TLS_ONLY)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", hba.display()));
        }
        self.tls_options = Some(format!(
            " -c ssl=on -c ssl_cert_file='{}' -c ssl_key_file='{}'",
            cert.display(),
            key.display()
        ));
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        // Sockets in our own dir: nothing shared with the system's server.
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c fsync=off -c synchronous_commit={} -c full_page_writes=off",
            self.port,
            self.dir.path().display(),
            if self.durable_commits { "on" } else { "off" }
        );
        options.push_str(self.tls_options.as_deref().unwrap_or_default());
        let output = self
            .pg_ctl()
            .args(["start", "-w", "-t", PG_CTL_WAIT_SECS, "-o", &options, "-l"])
            .arg(self.log_path())
            .arg("-D")
            .arg(&self.data)
            .output();
        match output {
            Ok(out) if out.status.success() => {}
            other => return Err(format!("{}\nserver log:\n{}", describe(&other), self.log())),
        }
        // pg_ctl waited on the socket; make sure TCP answers too.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() >= deadline {
                return Err(format!("nothing listens on 127.0.0.1:{}", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl fmt::Debug for PrivateCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateCluster")
            .field("port", &self.port)
            .field("data", &self.data)
            .field("tls", &self.tls_options.is_some())
            .field("frozen", &self.frozen)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl Drop for PrivateCluster {
    /// Thaws and stops the server; the temp dir is removed after.
    fn drop(&mut self) {
        self.stop();
    }
}

/// `pg_config --bindir`, or `None` when `pg_config` is not installed.
fn pg_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !output.status.success() {
        panic!(
            "pg_config --bindir failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let dir = String::from_utf8(output.stdout).expect("pg_config prints a UTF-8 path");
    Some(PathBuf::from(dir.trim()))
}

/// Whether this process runs as root: `/proc/self` belongs to our
/// effective user.
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

fn read_postmaster_pid(data: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// The PIDs whose parent is `parent`, from `/proc/<pid>/stat`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        panic!("/proc is not readable: cannot find the cluster's processes");
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parens.
            let after_comm = &stat[stat.rfind(')')? + 1..];
            let ppid: u32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// `kill -<name> <pids>`; a process that already exited is not an error.
fn signal(name: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .args(pids.iter().map(u32::to_string))
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("kill -{name} {pids:?} did not reach every process");
    }
}

fn check(output: std::io::Result<Output>, what: &str) {
    match output {
        Ok(out) if out.status.success() => {}
        other => panic!("{what} failed: {}", describe(&other)),
    }
}

fn describe(output: &std::io::Result<Output>) -> String {
    match output {
        Ok(out) => format!(
            "{}; stdout: {}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("cannot run it: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_freezes_thaws_and_stops() {
        let Some(mut cluster) = PrivateCluster::start() else {
            return;
        };
        let url = cluster.create_database("faults").await;
        assert!(
            url.ends_with(&format!(":{}/faults", cluster.port())),
            "{url}"
        );
        let client = cluster.client("faults").await;
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);

        cluster.freeze();
        // Every process of the cluster stopped: nothing can answer.
        let postmaster = cluster.postmaster_pid();
        crate::eventually(
            Duration::from_secs(5),
            "every process of the cluster is stopped",
            || async { stopped(postmaster) && children_of(postmaster).into_iter().all(stopped) },
        )
        .await;
        let mut query = std::pin::pin!(client.query_one("SELECT 2", &[]));
        let answered =
            std::future::poll_fn(|cx| std::task::Poll::Ready(query.as_mut().poll(cx))).await;
        assert!(answered.is_pending(), "a frozen cluster answered");
        cluster.thaw();
        // The query sent while frozen is answered after the thaw.
        let two: i32 = tokio::time::timeout(Duration::from_secs(10), query)
            .await
            .expect("the thawed cluster answers")
            .unwrap()
            .get(0);
        assert_eq!(two, 2);

        let postmaster = cluster.postmaster_pid();
        let dir = cluster.dir.path().to_owned();
        cluster.freeze();
        // Dropped while frozen: thawed, stopped, removed.
        drop(cluster);
        assert!(
            !Path::new(&format!("/proc/{postmaster}")).exists(),
            "the postmaster still runs"
        );
        assert!(!dir.exists(), "{} was not removed", dir.display());
        assert!(client.query_one("SELECT 3", &[]).await.is_err());
    }

    /// Whether process `pid` can do nothing, as `/proc` says: stopped by
    /// a signal, or exited (a zombie a stopped postmaster cannot reap, or
    /// gone).
    fn stopped(pid: u32) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return true;
        };
        // "pid (comm) state ...": comm may hold spaces and parens.
        let state = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next());
        matches!(state, Some("T" | "Z" | "X"))
    }

    #[tokio::test]
    async fn a_durable_cluster_starts_again_with_every_acknowledged_commit() {
        let Some(mut cluster) = PrivateCluster::start_durable() else {
            return;
        };
        let port = cluster.port();
        cluster.create_database("durable").await;
        let client = cluster.client("durable").await;
        client
            .batch_execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
            .await
            .unwrap();
        // Acknowledged just before the hard stop: it must survive it.
        client
            .execute("INSERT INTO t VALUES (2)", &[])
            .await
            .unwrap();
        cluster.stop();
        assert!(client.query_one("SELECT 1", &[]).await.is_err());
        cluster.start_again();
        assert_eq!(cluster.port(), port, "restarted on another port");
        let rows: i64 = cluster
            .client("durable")
            .await
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 2);
    }
}

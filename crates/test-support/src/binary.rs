//! The real `vilvik-keys` binary: [`ServedBinary`] for `serve`, [`command`]
//! and [`bootstrap`] for the rest, and [`StoreSettings`], the environment
//! that points it at a store.
//!
//! The binary is the one cargo builds beside the test executable
//! (`target/<profile>/vilvik-keys`): cargo builds a package's binaries
//! before its integration tests.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use vilvik_keys_test_db::{POLL_EVERY, TestDatabase};

use crate::app::Backend;
use crate::postgres::postgres_client;

/// How long a served binary may take to start listening or to exit.
const WITHIN: Duration = Duration::from_secs(30);

/// The `vilvik-keys` binary of this build.
pub fn path() -> PathBuf {
    let test = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/vilvik-keys
    let profile = test
        .parent()
        .and_then(Path::parent)
        .expect("the test executable sits in target/<profile>/deps");
    let binary = profile.join(format!("vilvik-keys{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "no vilvik-keys binary at {}: run the tests with cargo test",
        binary.display()
    );
    binary
}

/// The binary, in an empty environment: a test gives it exactly the
/// settings it means.
pub fn command() -> Command {
    let mut command = Command::new(path());
    command.env_clear();
    command
}

/// `vilvik-keys migrate` with `env` (the store's settings): makes the
/// store, as an operator does before `bootstrap`, which opens only an
/// existing one. Asserts it succeeded.
pub fn migrate<K, V>(env: impl IntoIterator<Item = (K, V)>)
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let output = command()
        .envs(env)
        .env("RUST_LOG", "warn")
        .arg("migrate")
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "migrate failed: {output:?}");
}

/// `vilvik-keys bootstrap --account <account>` with `env` (the store's
/// settings, `RUST_LOG`) on an existing store (see [`migrate`]); asserts
/// it succeeded and printed the management key alone on stdout. Returns
/// the key and what it logged on stderr.
pub fn bootstrap<K, V>(env: impl IntoIterator<Item = (K, V)>, account: &str) -> (String, String)
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let output = command()
        .envs(env)
        .args(["bootstrap", "--account", account])
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "bootstrap failed: {output:?}");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 on stdout");
    let secret = stdout.trim().to_owned();
    assert!(secret.starts_with("vlk_"), "bootstrap printed {secret:?}");
    assert_eq!(
        secret.lines().count(),
        1,
        "stdout is the secret alone: {secret:?}"
    );
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    (secret, log)
}

/// `command` run to its end, at most `within`; killed past that, and the
/// test fails (it was expected to stop on its own).
pub fn output_within(mut command: Command, within: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let deadline = Instant::now() + within;
    while child.try_wait().expect("the child's status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("the killed child's output");
            panic!("did not exit within {within:?}: {output:?}");
        }
        std::thread::sleep(POLL_EVERY);
    }
    child.wait_with_output().expect("the child's output")
}

/// `sh -c <line>`, run off the test's runtime threads: for commands the
/// service prints for people to paste.
pub async fn sh(line: &str) -> Output {
    let line = line.to_owned();
    tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg("-c")
            .arg(&line)
            .output()
            .expect("sh runs")
    })
    .await
    .expect("the command's thread")
}

/// A printed curl command (`curl …`) run as [`sh`] runs it, once curl is
/// known to be installed: without curl the test fails rather than skips.
pub async fn sh_curl(line: &str) -> Output {
    assert!(line.starts_with("curl "), "not a curl command: {line}");
    let curl = Command::new("curl").arg("--version").output();
    assert!(
        curl.is_ok_and(|output| output.status.success()),
        "curl is needed for this test: apt-get install curl"
    );
    sh(line).await
}

/// The settings that point the binary at a store, as environment
/// variables, and the store itself for a test to look into.
#[derive(Debug)]
pub struct StoreSettings {
    env: Vec<(String, String)>,
    sqlite_path: Option<PathBuf>,
    postgres_url: Option<String>,
    _database: Option<TestDatabase>,
}

impl StoreSettings {
    /// A fresh store on `backend`: the SQLite file `dir/keys.db` (its
    /// pepper generated beside it on the first start), or a fresh Postgres
    /// database with the pepper file `dir/current.pepper`. `None` when the
    /// backend is Postgres and no test database is configured (skipped).
    pub async fn create(backend: Backend, dir: &Path) -> Option<Self> {
        Some(match backend {
            Backend::Sqlite => Self::sqlite(dir.join("keys.db")),
            Backend::Postgres => {
                let database = TestDatabase::create().await?;
                let pepper = dir.join("current.pepper");
                vilvik_keys::pepper::create(&pepper).expect("a pepper file");
                let mut settings = Self::postgres(database.url().to_owned(), &pepper);
                settings._database = Some(database);
                settings
            }
        })
    }

    /// The SQLite file at `path`.
    pub fn sqlite(path: PathBuf) -> Self {
        Self {
            env: vec![(
                "VILVIK_KEYS_SQLITE_PATH".to_owned(),
                path.display().to_string(),
            )],
            sqlite_path: Some(path),
            postgres_url: None,
            _database: None,
        }
    }

    /// The Postgres database at `url` with the pepper file `pepper` (which
    /// must exist: named explicitly, it is not generated).
    pub fn postgres(url: String, pepper: &Path) -> Self {
        Self {
            env: vec![
                ("DATABASE_URL".to_owned(), url.clone()),
                (
                    "VILVIK_KEYS_PEPPER_FILE".to_owned(),
                    pepper.display().to_string(),
                ),
            ],
            sqlite_path: None,
            postgres_url: Some(url),
            _database: None,
        }
    }

    /// The variables, for [`Command::envs`] and [`Serve::envs`].
    pub fn env(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The SQLite file, when the store is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        self.sqlite_path.as_deref()
    }

    /// A session on the Postgres database; panics on SQLite.
    pub async fn postgres_client(&self) -> tokio_postgres::Client {
        postgres_client(self.postgres_url.as_deref().expect("a Postgres store")).await
    }
}

/// How to start a [`ServedBinary`]: [`ServedBinary::serve`], then
/// [`Serve::env`] and [`Serve::start`].
#[derive(Debug, Default)]
pub struct Serve {
    env: Vec<(OsString, OsString)>,
    log: Option<PathBuf>,
}

impl Serve {
    /// Sets one variable of the process's environment (which starts empty
    /// but for `RUST_LOG=info` and port 0 on both listeners, each of which
    /// this overrides). The log may be in either format, but must keep the
    /// `info` lines that say where each listener listens.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Sets several variables, as [`Serve::env`].
    pub fn envs<K, V>(mut self, env: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (key, value) in env {
            self = self.env(key, value);
        }
        self
    }

    /// Appends the process's stderr (its log) to `path` instead of a file
    /// in a directory of its own.
    pub fn log_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// Starts the process and waits until it logs that both listeners are
    /// listening; panics (with its log) when it exits first or takes longer
    /// than 30 s.
    pub async fn start(self) -> ServedBinary {
        let (log, dir) = match self.log {
            Some(log) => (log, None),
            None => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                (dir.path().join("serve.log"), Some(dir))
            }
        };
        let mut served = ServedBinary {
            env: self.env,
            log,
            _dir: dir,
            child: None,
            admin_addr: None,
            verify_addr: None,
            starts: 0,
        };
        served.spawn(None).await;
        served
    }
}

/// A `vilvik-keys serve` process, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ServedBinary {
    env: Vec<(OsString, OsString)>,
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
    child: Option<Child>,
    admin_addr: Option<SocketAddr>,
    verify_addr: Option<SocketAddr>,
    starts: usize,
}

/// How a served process ended, and when the test saw it end.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub status: ExitStatus,
    pub at: Instant,
}

impl Exit {
    /// The exit code; `None` when a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl ServedBinary {
    /// `vilvik-keys serve`, configured by what follows.
    pub fn serve() -> Serve {
        Serve::default()
    }

    /// Spawns the process (on the ports it had, when `pinned`) and waits
    /// for its listeners.
    async fn spawn(&mut self, pinned: Option<(SocketAddr, SocketAddr)>) {
        assert!(self.child.is_none(), "the server runs already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("the server's log file opens");
        let logged_before = log.metadata().map_or(0, |m| m.len());
        let (admin, verify) = pinned.map_or_else(
            || ("127.0.0.1:0".to_owned(), "127.0.0.1:0".to_owned()),
            |(admin, verify)| (admin.to_string(), verify.to_string()),
        );
        let mut command = command();
        command
            .arg("serve")
            .env("RUST_LOG", "info")
            .env("VILVIK_KEYS_ADMIN_ADDR", admin)
            .env("VILVIK_KEYS_VERIFY_ADDR", verify)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log);
        if pinned.is_some() {
            command
                .env("VILVIK_KEYS_ADMIN_ADDR", self.admin_addr().to_string())
                .env("VILVIK_KEYS_VERIFY_ADDR", self.verify_addr().to_string());
        }
        self.child = Some(command.spawn().expect("the binary starts"));
        self.starts += 1;
        self.wait_until_listening(logged_before).await;
    }

    /// Reads the "listening" lines the process logs past byte `from` of
    /// its log until both listeners are there.
    async fn wait_until_listening(&mut self, from: u64) {
        let (admin, verify) = self
            .until(WITHIN, "listen", |served| {
                let log = std::fs::read(&served.log).unwrap_or_default();
                let start = usize::try_from(from).unwrap_or(usize::MAX).min(log.len());
                let (mut admin, mut verify) = (None, None);
                for line in String::from_utf8_lossy(&log[start..]).lines() {
                    match listening(line) {
                        Some(("admin", addr)) => admin = Some(addr),
                        Some(("verify", addr)) => verify = Some(addr),
                        _ => {}
                    }
                }
                admin.zip(verify)
            })
            .await;
        self.admin_addr = Some(admin);
        self.verify_addr = Some(verify);
    }

    /// Polls `found` every few milliseconds until it finds something;
    /// panics, with the log, when the process exits first or when
    /// `within` passes (`what` says what it did not do).
    async fn until<T>(
        &mut self,
        within: Duration,
        what: &str,
        mut found: impl FnMut(&mut Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(found) = found(self) {
                return found;
            }
            if let Some(status) = self.try_exit() {
                panic!(
                    "the server exited ({status}) before it did {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the server did not {what} within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr.expect("the server listened")
    }

    /// The verify listener's address.
    pub fn verify_addr(&self) -> SocketAddr {
        self.verify_addr.expect("the server listened")
    }

    /// How many times the process was started.
    pub fn starts(&self) -> usize {
        self.starts
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the server runs");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// Sends SIGHUP (reload the TLS files).
    pub fn sighup(&self) {
        self.signal("-HUP");
    }

    /// SIGKILL (`kill -9`), and waits until the process is gone.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the server runs");
        child.kill().expect("SIGKILL is delivered");
        child.wait().expect("the killed server is reaped");
    }

    /// Starts the process again, on the same ports and with the same
    /// settings, and waits for its listeners.
    pub async fn restart(&mut self) {
        let ports = (self.admin_addr(), self.verify_addr());
        self.spawn(Some(ports)).await;
    }

    /// The exit status, when the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("the server's status")
    }

    /// Waits until the process exits; panics (with its log) when that takes
    /// longer than `within`.
    pub async fn wait_for_exit(&mut self, within: Duration) -> Exit {
        let status = self.until(within, "exit", Self::try_exit).await;
        Exit {
            status,
            at: Instant::now(),
        }
    }

    /// Everything the process logged (every start's, in order).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's last `lines` lines at level WARN or above (in either
    /// format).
    pub fn warnings_tail(&self, lines: usize) -> String {
        let log = self.log();
        let warnings: Vec<&str> = log.lines().filter(|line| is_warning(line)).collect();
        warnings[warnings.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the process logs a line containing every one of
    /// `needles`; returns the line. Panics (with the log) when it exits
    /// first or `within` passes.
    pub async fn wait_for_log(&mut self, needles: &[&str], within: Duration) -> String {
        let what = format!("log {needles:?}");
        self.until(within, &what, |served| {
            let log = served.log();
            let line = log.lines().find(|l| needles.iter().all(|n| l.contains(n)));
            line.map(str::to_owned)
        })
        .await
    }
}

impl Drop for ServedBinary {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The listener and address of a "listening" line, in either log format.
fn listening(line: &str) -> Option<(&'static str, SocketAddr)> {
    if !line.contains("listening") {
        return None;
    }
    let (listener, addr) = match serde_json::from_str::<serde_json::Value>(line) {
        Ok(json) if json["message"] == "listening" => (
            json["listener"].as_str()?.to_owned(),
            json["addr"].as_str()?.to_owned(),
        ),
        Ok(_) => return None,
        Err(_) => {
            let plain = without_colours(line);
            plain.split_whitespace().find(|w| *w == "listening")?;
            let field = |name: &str| {
                plain.split_whitespace().find_map(|word| {
                    let value = word.strip_prefix(name)?.strip_prefix('=')?;
                    Some(value.trim_matches('"').to_owned())
                })
            };
            (field("listener")?, field("addr")?)
        }
    };
    let listener = match listener.as_str() {
        "admin" => "admin",
        "verify" => "verify",
        _ => return None,
    };
    Some((listener, addr.parse().ok()?))
}

/// Whether a log line (in either format) is at level WARN or above.
fn is_warning(line: &str) -> bool {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(json) => matches!(json["level"].as_str(), Some("WARN" | "ERROR")),
        Err(_) => without_colours(line)
            .split_whitespace()
            .take(3)
            .any(|word| word == "WARN" || word == "ERROR"),
    }
}

/// `line` without the ANSI colour sequences of the human log format.
fn without_colours(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters, up to the final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"timestamp":"2026-01-01T00:00:00.000000Z","level":"INFO","message":"listening","listener":"admin","addr":"127.0.0.1:4100","tls":"off","target":"vilvik_keys::startup"}"#;
    const PRETTY: &str = "\u{1b}[2m2026-01-01T00:00:00.000000Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mvilvik_keys::startup\u{1b}[0m\u{1b}[2m:\u{1b}[0m listening \u{1b}[3mlistener\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"verify\" \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:4101 \u{1b}[3mtls\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"off\"";

    #[test]
    fn a_listening_line_is_read_in_either_log_format() {
        let addr = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(listening(JSON), Some(("admin", addr("127.0.0.1:4100"))));
        assert_eq!(listening(PRETTY), Some(("verify", addr("127.0.0.1:4101"))));
        let other = JSON.replace(
            r#""message":"listening""#,
            r#""message":"stopped listening""#,
        );
        assert_eq!(listening(&other), None);
        assert_eq!(listening("INFO vilvik_keys: listening soon"), None);
    }

    #[test]
    fn warnings_are_told_apart_in_either_log_format() {
        assert!(!is_warning(JSON));
        assert!(is_warning(&JSON.replace("INFO", "WARN")));
        assert!(!is_warning(PRETTY));
        assert!(is_warning(&PRETTY.replace(" INFO", " ERROR")));
    }
}

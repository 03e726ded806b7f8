//! A small versioned-migration runner serving both backends.
//!
//! Each backend has its own numbered SQL files under `migrations/`, one
//! for each step of `migrations!`; a `schema_migrations` table records
//! which have run, with a checksum of each file's statements
//! ([`Migration::checksum`]: comments and blank lines do not count, so
//! they may be reworded). Migrations only ever get appended: a file whose
//! statements changed after it was applied stops the start (see [`plan`]).
//! The apply loop is [`run`], once for both; a backend supplies only its
//! [`Ledger`].

use std::collections::BTreeMap;

use time::OffsetDateTime;
use vilvik_keys_domain::format_time;

use crate::chain::{self, Head};
use crate::rules::corrupt;
use crate::{Result, StoreError, StoredAuditEvent};

/// One schema step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
    /// The checksums a ledger recorded for this file while checksums
    /// covered the whole text, comments included (see [`WHOLE_FILE`]).
    pub whole_file: Option<WholeFile>,
}

/// A file's checksums as first shipped: of its whole text, and of its
/// statements then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WholeFile {
    pub text: &'static str,
    pub statements: &'static str,
}

impl Migration {
    /// The file it was read from, as an operator looks for it.
    pub fn file(&self) -> String {
        format!("{:04}_{}.sql", self.version, self.name)
    }

    /// BLAKE3 of the file's statements ([`statements`]), in hex.
    pub fn checksum(&self) -> String {
        blake3::hash(statements(self.sql).as_bytes())
            .to_hex()
            .to_string()
    }

    /// Whether `recorded` is the checksum of this file's whole text from
    /// a ledger that recorded those, and the statements are still the ones
    /// that text held: the same migration, its checksum recorded under the
    /// older rule.
    fn recorded_whole(&self, recorded: &str) -> bool {
        self.whole_file
            .is_some_and(|w| w.text == recorded && w.statements == self.checksum())
    }
}

/// The SQL text without its `--` comments (each runs to the end of its
/// line; no string literal in a migration holds `--`), without trailing
/// white space and without the lines that leaves empty; every line kept
/// ends with `\n`.
pub(crate) fn statements(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    for line in sql.lines() {
        let code = line.find("--").map_or(line, |at| &line[..at]).trim_end();
        if !code.is_empty() {
            out.push_str(code);
            out.push('\n');
        }
    }
    out
}

/// Every step, in order, written once for both backends: its number and
/// name, which make its file `migrations/<backend>/<number>_<name>.sql`.
/// `$column` picks the backend's checksums in [`WHOLE_FILE`].
macro_rules! migrations {
    ($backend:literal, $column:literal) => {
        &[
            migration!($backend, $column, "0001", "initial"),
            migration!($backend, $column, "0002", "change_log_floor"),
            migration!($backend, $column, "0003", "pepper_id"),
            migration!(
                $backend,
                $column,
                "0004",
                "account_scopes_and_secret_history"
            ),
            migration!($backend, $column, "0005", "audit_chain"),
            migration!($backend, $column, "0006", "request_ids_and_versions"),
            migration!($backend, $column, "0007", "request_id_callers"),
            migration!($backend, $column, "0008", "use_origins_and_counts"),
        ]
    };
}

macro_rules! migration {
    ($backend:literal, $column:literal, $number:literal, $name:literal) => {
        Migration {
            version: version($number),
            name: $name,
            sql: include_str!(concat!(
                "../migrations/",
                $backend,
                "/",
                $number,
                "_",
                $name,
                ".sql"
            )),
            whole_file: whole_file(version($number), $column),
        }
    };
}

pub(crate) const SQLITE: &[Migration] = migrations!("sqlite", 0);
pub(crate) const POSTGRES: &[Migration] = migrations!("postgres", 1);

/// A file's number as a version: "0004" is 4.
const fn version(number: &str) -> i64 {
    let digits = number.as_bytes();
    let (mut version, mut i) = (0, 0);
    while i < digits.len() {
        version = version * 10 + (digits[i] - b'0') as i64;
        i += 1;
    }
    version
}

/// Until checksums left comments out, ledgers recorded BLAKE3 of each
/// file's whole text. For each step that shipped then, SQLite's file and
/// then Postgres's: that checksum, and the checksum of the file's
/// statements as it shipped. A ledger holding the first for a file whose
/// statements still have the second holds the same migration ([`plan`]
/// replaces it). Never change these.
const WHOLE_FILE: [[(&str, &str); 2]; 6] = [
    [
        (
            "e097b1a41a5c97ff55e247c49a9f8bd9abdefc41f088a20b722960f8f260a2ae",
            "aafdeee297cccae5daf0cc4612d32919abc364c5084398d625ade4a838f6687f",
        ),
        (
            "492159953875428f49f6c52218ca8be5769a6fbd1f1804c2310d9f736b3adb72",
            "d299fd23f6853e4b9fbbf4c2cfa2b3d167d01109b5c0588ceb3d815962dc4932",
        ),
    ],
    [
        (
            "dfd7dcf181fdec50537fb697cbf6f0bcf678c3de59b9aca8b199641963f0ed30",
            "f89537692c939b801c8ddde1738af1e67b15fdbb46f99c3b4deb5b60b97d3f9f",
        ),
        (
            "9449e1d9d7b438a7c60a03f50e66bd965121cf4049c8d289331b8a7b9d386b92",
            "447534ac28fde18d970a29517262423f52392e581a5cffcb2aa181252367e788",
        ),
    ],
    [
        (
            "f1f8bbc511a83a4edefd2f2a8e8d1704a64dfbb5a54c02ce542fd58684810cef",
            "0e2c578c81c4e3e14e3a6a29a80967f6498627cac84715fcae92f2056ba45519",
        ),
        (
            "362d6dd546b3e064dc6aa9c0f21b85a34551ced5dd16e714d9b71d27e0bf2de7",
            "121b7e1c4f187b934105a505b1d06973cf3433386caf6424177875e14012355e",
        ),
    ],
    [
        (
            "8342d27fb74b8b64d9c567abe46e412e235bf25fc03433465423947676782ee1",
            "2aed43b0ac4a9d70822e49c26b2124d408e174a7508d9035cfa6a099b551fe45",
        ),
        (
            "8877beb8ebe125a45b137e95c50ed1b8e8840921c680e5772b0e87c8ebee048c",
            "4fab11448d151ff8f2143c995bef81cc6aef8d778af3cdcf3a76f5820c6ffa87",
        ),
    ],
    [
        (
            "93e2deef49b7e2e780eae73548aafbabaea1acd507c7f7065e858473697d9623",
            "f77071c7b17031604edc224cf0ac7957dbfa68f2d621e9334c5e2c01c20e8665",
        ),
        (
            "58fdd47ed6258e48beb0e6c86bfd54bac8b46c680d7af6377b15e8bc86f8f7fb",
            "092e55a1b10f5339c766f8755d2cbaa3b3845c5f315acbf8f706c0111c5da40b",
        ),
    ],
    [
        (
            "2d64c9c29a13fa0ef8b0bc101425bac5757298f2acfebc2fd0353be91594ae29",
            "3c7d5643ef8481dd46f71c277bd1224920e4f643bc26191ed27ce5a24c21ae6a",
        ),
        (
            "08cade5b838577bb164caa2fa724d8527e602ef4b820df15203562e28f275425",
            "1cfac2035ad48c0d284d85cc4a6a29303170dbcff638de40b93cd84fc4ae4147",
        ),
    ],
];

/// The whole-file checksums of step `version` in `column` of
/// [`WHOLE_FILE`], if it shipped while ledgers recorded those.
const fn whole_file(version: i64, column: usize) -> Option<WholeFile> {
    let step = (version - 1) as usize;
    if step >= WHOLE_FILE.len() {
        return None;
    }
    let (text, statements) = WHOLE_FILE[step][column];
    Some(WholeFile { text, statements })
}

/// The migration after whose SQL [`run`] chains the audit events written
/// before it ([`chain_audit_events`]): hashes need Rust.
pub(crate) const AUDIT_CHAIN: &str = "audit_chain";

/// Shared by both backends: the table that remembers applied versions.
/// `checksum` is nullable: ledgers from before checksums gain the column
/// empty, and [`run`] fills it in.
pub(crate) const CREATE_LEDGER: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    BIGINT PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    checksum   TEXT
)";

/// A row of `schema_migrations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Applied {
    pub version: i64,
    pub checksum: Option<String>,
}

/// What a backend does for [`run`], all inside one transaction.
pub(crate) trait Ledger {
    /// Creates the ledger, or adds the `checksum` column to one from
    /// before checksums.
    async fn prepare(&mut self) -> Result<()>;
    /// Every row of the ledger.
    async fn applied(&mut self) -> Result<Vec<Applied>>;
    /// Sets the checksum of a row recorded without one, or with the
    /// checksum of its whole file.
    async fn record_checksum(&mut self, version: i64, checksum: &str) -> Result<()>;
    /// Runs the migration's SQL and records it.
    async fn apply(&mut self, migration: &Migration, checksum: &str, at: &str) -> Result<()>;
    /// The next [`CHAIN_BATCH`] events without a hash after row id
    /// `after`, in row id order.
    async fn unchained_events(&mut self, after: i64) -> Result<Vec<StoredAuditEvent>>;
    /// Writes each event's number and hashes.
    async fn chain_events(&mut self, links: &[ChainedEvent]) -> Result<()>;
    /// Writes each account's head.
    async fn write_heads(&mut self, heads: &BTreeMap<String, Head>) -> Result<()>;
}

/// How many events [`chain_audit_events`] reads at a time.
pub(crate) const CHAIN_BATCH: i64 = 1000;

/// An event written before the chain, once chained: its row, its number
/// and its predecessor's hash and its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChainedEvent {
    pub row_id: i64,
    pub seq: i64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// Chains every audit event that has no hash yet, in row id order per
/// account, [`CHAIN_BATCH`] rows at a time with each account's running
/// head in memory (one per account, not one per event), then writes the
/// heads; returns how many events it chained.
async fn chain_audit_events(ledger: &mut impl Ledger) -> Result<u64> {
    let mut heads: BTreeMap<String, Head> = BTreeMap::new();
    let (mut after, mut chained) = (0_i64, 0_u64);
    loop {
        let events = ledger.unchained_events(after).await?;
        let Some(last) = events.last() else { break };
        after = last.row_id;
        let mut links = Vec::with_capacity(events.len());
        for event in &events {
            let changes = event.changes.as_ref().ok_or_else(|| {
                corrupt("audit changes")(format!("event row {} holds no JSON", event.row_id))
            })?;
            let head = heads.entry(event.account_id.clone()).or_insert(Head::EMPTY);
            let next = chain::chain_stored(*head, event, changes);
            links.push(ChainedEvent {
                row_id: event.row_id,
                seq: next.seq,
                prev_hash: head.hash,
                hash: next.hash,
            });
            *head = next;
        }
        chained += links.len() as u64;
        ledger.chain_events(&links).await?;
    }
    ledger.write_heads(&heads).await?;
    Ok(chained)
}

/// What [`run`] is to do, decided from the ledger alone.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan<'a> {
    /// Applied before checksums were recorded: trusted as they are, their
    /// checksums get filled in.
    pub unchecked: Vec<&'a Migration>,
    /// Recorded with the checksum of the file's whole text, as they were
    /// while checksums counted comments: the same statements, their
    /// checksums get replaced.
    pub whole_file: Vec<&'a Migration>,
    /// Newer than every applied version, in order.
    pub pending: Vec<&'a Migration>,
}

/// Checks the ledger against `list` and says what to do. A migration whose
/// recorded checksum is neither its statements' nor that of the whole
/// file they shipped in is an error naming the file.
/// Versions this binary does not know (a newer one migrated) are left be.
pub(crate) fn plan<'a>(list: &'a [Migration], applied: &[Applied]) -> Result<Plan<'a>> {
    let (mut unchecked, mut whole_file) = (Vec::new(), Vec::new());
    for row in applied {
        let Some(m) = list.iter().find(|m| m.version == row.version) else {
            continue;
        };
        match &row.checksum {
            None => unchecked.push(m),
            Some(recorded) if *recorded == m.checksum() => {}
            Some(recorded) if m.recorded_whole(recorded) => whole_file.push(m),
            Some(recorded) => {
                return Err(StoreError::internal(format!(
                    "migration {} was changed after it was applied (recorded checksum {recorded}, \
                     the file's is now {}): shipped migrations must never change; restore the \
                     file and put the change in a new migration",
                    m.file(),
                    m.checksum()
                )));
            }
        }
    }
    let current = applied.iter().map(|a| a.version).max().unwrap_or(0);
    let pending = list.iter().filter(|m| m.version > current).collect();
    Ok(Plan {
        unchecked,
        whole_file,
        pending,
    })
}

/// Brings the ledger's database up to `list`; returns how many migrations
/// ran. The caller holds the transaction (and, on Postgres, the lock).
pub(crate) async fn run(ledger: &mut impl Ledger, list: &[Migration]) -> Result<usize> {
    ledger.prepare().await?;
    let plan = plan(list, &ledger.applied().await?)?;
    for m in plan.unchecked.iter().chain(&plan.whole_file) {
        ledger.record_checksum(m.version, &m.checksum()).await?;
    }
    let at = format_time(OffsetDateTime::now_utc());
    for m in &plan.pending {
        ledger.apply(m, &m.checksum(), &at).await?;
        if m.name == AUDIT_CHAIN {
            let chained = chain_audit_events(ledger).await?;
            tracing::info!(
                events = chained,
                "chained the audit events written before 0005"
            );
        }
    }
    Ok(plan.pending.len())
}

/// The error for a migration whose SQL failed.
pub(crate) fn failed(
    m: &Migration,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::internal_from(format!("migration {} failed", m.file()), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_contiguous_and_both_backends_agree() {
        for list in [SQLITE, POSTGRES] {
            for (i, m) in list.iter().enumerate() {
                assert_eq!(m.version, i as i64 + 1);
            }
        }
        assert_eq!(SQLITE.len(), POSTGRES.len());
        for (a, b) in SQLITE.iter().zip(POSTGRES) {
            assert_eq!(a.name, b.name);
        }
    }

    fn recorded(list: &[Migration]) -> Vec<Applied> {
        list.iter()
            .map(|m| Applied {
                version: m.version,
                checksum: Some(m.checksum()),
            })
            .collect()
    }

    #[test]
    fn a_fresh_database_gets_every_migration_in_order() {
        let plan = plan(SQLITE, &[]).unwrap();
        assert!(plan.unchecked.is_empty());
        let versions: Vec<i64> = plan.pending.iter().map(|m| m.version).collect();
        let all: Vec<i64> = SQLITE.iter().map(|m| m.version).collect();
        assert_eq!(versions, all);
    }

    #[test]
    fn an_up_to_date_ledger_plans_nothing() {
        let plan = plan(POSTGRES, &recorded(POSTGRES)).unwrap();
        assert_eq!(
            plan,
            Plan {
                unchecked: vec![],
                whole_file: vec![],
                pending: vec![]
            }
        );
    }

    #[test]
    fn only_versions_past_the_newest_applied_are_pending() {
        let applied = recorded(&SQLITE[..1]);
        let plan = plan(SQLITE, &applied).unwrap();
        assert_eq!(plan.pending.len(), SQLITE.len() - 1);
        assert!(plan.pending.iter().all(|m| m.version > 1));
    }

    #[test]
    fn a_changed_migration_is_refused_naming_its_file() {
        let mut applied = recorded(SQLITE);
        let last = applied.last_mut().unwrap();
        last.checksum = Some("0".repeat(64));
        let err = plan(SQLITE, &applied).unwrap_err().to_string();
        let file = SQLITE.last().unwrap().file();
        assert!(
            err.contains(&format!(
                "migration {file} was changed after it was applied"
            )),
            "{err}"
        );
    }

    #[test]
    fn rows_without_a_checksum_are_trusted_and_filled_in() {
        let mut applied = recorded(POSTGRES);
        for row in &mut applied {
            row.checksum = None;
        }
        let plan = plan(POSTGRES, &applied).unwrap();
        assert_eq!(plan.unchecked.len(), POSTGRES.len());
        assert!(plan.pending.is_empty());
    }

    #[test]
    fn versions_this_binary_does_not_know_are_left_alone() {
        let mut applied = recorded(SQLITE);
        applied.push(Applied {
            version: SQLITE.last().unwrap().version + 1,
            checksum: Some("from a newer binary".into()),
        });
        assert_eq!(
            plan(SQLITE, &applied).unwrap(),
            Plan {
                unchecked: vec![],
                whole_file: vec![],
                pending: vec![]
            }
        );
    }

    #[test]
    fn statements_leave_out_comments_and_blank_lines() {
        let sql = "-- What the table is for.\nCREATE TABLE t (\n    a INT, -- why a\n\n   \n    b INT\n);  \n";
        assert_eq!(
            statements(sql),
            "CREATE TABLE t (\n    a INT,\n    b INT\n);\n"
        );
        let reworded = Migration {
            sql: "-- Another comment.\nCREATE TABLE t (\n    a INT,\n    b INT\n);\n",
            ..SQLITE[0]
        };
        let with = |sql| Migration { sql, ..SQLITE[0] };
        assert_eq!(with(sql).checksum(), reworded.checksum());
        assert_ne!(
            with(sql).checksum(),
            with("CREATE TABLE t (\n    a BIGINT,\n    b INT\n);\n").checksum()
        );
    }

    /// The checksums of [`WHOLE_FILE`] stand for a migration only while
    /// its statements are the ones it shipped with: shipped migrations
    /// never change. Every step up to the last in [`WHOLE_FILE`] has
    /// them; later ones shipped with statement checksums only.
    #[test]
    fn every_shipped_migration_keeps_its_statements() {
        for m in SQLITE.iter().chain(POSTGRES) {
            match m.whole_file {
                Some(shipped) => assert_eq!(m.checksum(), shipped.statements, "{}", m.file()),
                None => assert!(m.version > WHOLE_FILE.len() as i64, "{}", m.file()),
            }
        }
    }

    /// [`statements`] takes `--` anywhere for a comment.
    #[test]
    fn no_string_literal_in_a_migration_holds_a_comment_marker() {
        for m in SQLITE.iter().chain(POSTGRES) {
            for line in m.sql.lines() {
                let code = line.split("--").next().unwrap_or_default();
                assert_eq!(code.matches('\'').count() % 2, 0, "{}: {line}", m.file());
            }
        }
    }

    /// Steps applied by a release that recorded whole-file checksums, then
    /// later steps with their statements' checksums.
    #[test]
    fn a_ledger_with_whole_file_checksums_gets_them_replaced() {
        for list in [SQLITE, POSTGRES] {
            let applied: Vec<Applied> = list
                .iter()
                .map(|m| Applied {
                    version: m.version,
                    checksum: Some(m.whole_file.map_or_else(|| m.checksum(), |w| w.text.into())),
                })
                .collect();
            let plan = plan(list, &applied).unwrap();
            assert_eq!(plan.whole_file.len(), WHOLE_FILE.len());
            assert!(plan.unchecked.is_empty() && plan.pending.is_empty());
        }
    }

    #[test]
    fn another_file_s_whole_checksum_is_a_change() {
        let mut applied = recorded(SQLITE);
        applied[2].checksum = SQLITE[1].whole_file.map(|w| w.text.to_owned());
        let err = plan(SQLITE, &applied).unwrap_err().to_string();
        assert!(
            err.contains("migration 0003_pepper_id.sql was changed after it was applied"),
            "{err}"
        );
        // Nor does a whole-file checksum stand for statements changed since.
        let changed = Migration {
            sql: "ALTER TABLE key_secrets ADD COLUMN pepper_id TEXT;\n",
            ..SQLITE[2]
        };
        let whole = SQLITE[2].whole_file.unwrap().text;
        assert!(!changed.recorded_whole(whole));
        assert!(SQLITE[2].recorded_whole(whole));
    }

    #[test]
    fn each_list_has_the_step_that_chains_the_audit_log() {
        for list in [SQLITE, POSTGRES] {
            assert!(list.iter().any(|m| m.name == AUDIT_CHAIN));
        }
        assert_eq!(version("0004"), 4);
        assert_eq!(version("0012"), 12);
    }

    #[test]
    fn files_are_named_as_on_disk() {
        assert_eq!(SQLITE[0].file(), "0001_initial.sql");
        assert_eq!(SQLITE[0].checksum().len(), 64);
    }
}

/// Real databases whose ledger holds the whole-file checksums, as those
/// migrated by a release that recorded them do, start: the checksums are
/// replaced with their statements', and any other checksum still stops
/// the start naming the file. The tests write `schema_migrations` with a
/// connection of their own.
#[cfg(test)]
mod whole_file_ledgers {
    use super::*;
    use crate::{PostgresStore, SqliteStore, Store};

    fn record(version: i64, checksum: &str) -> String {
        format!("UPDATE schema_migrations SET checksum = '{checksum}' WHERE version = {version}")
    }

    fn whole(list: &[Migration], version: i64) -> &'static str {
        list[version as usize - 1].whole_file.unwrap().text
    }

    /// `store`'s database is migrated; `exec` runs SQL on it and
    /// `checksums` reads its ledger's checksums in version order.
    async fn starts_and_refuses(
        store: &dyn Store,
        list: &[Migration],
        other_backend: &[Migration],
        exec: impl AsyncFn(String),
        checksums: impl AsyncFn() -> Vec<String>,
    ) {
        let current = checksums().await;
        let expected: Vec<String> = list.iter().map(Migration::checksum).collect();
        assert_eq!(current, expected);
        // The steps that shipped while ledgers recorded whole files.
        for m in list.iter().filter(|m| m.whole_file.is_some()) {
            exec(record(m.version, whole(list, m.version))).await;
        }
        assert_eq!(store.migrate().await.unwrap(), 0);
        assert_eq!(checksums().await, current, "replaced by the statements'");
        assert_eq!(store.migrate().await.unwrap(), 0);

        let refused = async |checksum: &str| {
            exec(record(3, checksum)).await;
            let err = store.migrate().await.unwrap_err().to_string();
            assert!(
                err.contains("migration 0003_pepper_id.sql was changed after it was applied"),
                "{err}"
            );
        };
        refused(whole(list, 2)).await; // another file's
        refused(whole(other_backend, 3)).await; // the other backend's file
    }

    #[tokio::test]
    async fn sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.migrate().await.unwrap(), SQLITE.len());
        let conn = std::sync::Mutex::new(rusqlite::Connection::open(&path).unwrap());
        let exec = async |sql: String| conn.lock().unwrap().execute_batch(&sql).unwrap();
        let checksums = async || {
            let conn = conn.lock().unwrap();
            let mut stmt = conn
                .prepare("SELECT checksum FROM schema_migrations ORDER BY version")
                .unwrap();
            let rows = stmt.query_map([], |r| r.get(0)).unwrap();
            rows.map(Result::unwrap).collect()
        };
        starts_and_refuses(&store, SQLITE, POSTGRES, exec, checksums).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let Some(db) = vilvik_keys_test_db::TestDatabase::create().await else {
            return;
        };
        let store = PostgresStore::connect(db.url()).await.unwrap();
        assert_eq!(store.migrate().await.unwrap(), POSTGRES.len());
        let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let exec = async |sql: String| client.batch_execute(&sql).await.unwrap();
        let checksums = async || {
            let sql = "SELECT checksum FROM schema_migrations ORDER BY version";
            let rows = client.query(sql, &[]).await.unwrap();
            rows.iter().map(|row| row.get(0)).collect()
        };
        starts_and_refuses(&store, POSTGRES, SQLITE, exec, checksums).await;
    }
}

//! A small versioned-migration runner serving both backends.
//!
//! Each backend has its own numbered SQL files under `migrations/`; a
//! `schema_migrations` table records which have run, with a checksum of
//! each file's text. Migrations only ever get appended: a file changed
//! after it was applied stops the start (see [`plan`]). The apply loop is
//! [`run`], once for both; a backend supplies only its [`Ledger`].

use time::OffsetDateTime;

use std::collections::BTreeMap;

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
}

impl Migration {
    /// The file it was read from, as an operator looks for it.
    pub fn file(&self) -> String {
        format!("{:04}_{}.sql", self.version, self.name)
    }

    /// BLAKE3 of the SQL text, in hex.
    pub fn checksum(&self) -> String {
        blake3::hash(self.sql.as_bytes()).to_hex().to_string()
    }
}

pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../migrations/sqlite/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "change_log_floor",
        sql: include_str!("../migrations/sqlite/0002_change_log_floor.sql"),
    },
    Migration {
        version: 3,
        name: "pepper_id",
        sql: include_str!("../migrations/sqlite/0003_pepper_id.sql"),
    },
    Migration {
        version: 4,
        name: "account_scopes_and_secret_history",
        sql: include_str!("../migrations/sqlite/0004_account_scopes_and_secret_history.sql"),
    },
    Migration {
        version: 5,
        name: AUDIT_CHAIN,
        sql: include_str!("../migrations/sqlite/0005_audit_chain.sql"),
    },
    Migration {
        version: 6,
        name: "request_ids_and_versions",
        sql: include_str!("../migrations/sqlite/0006_request_ids_and_versions.sql"),
    },
];

pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "change_log_floor",
        sql: include_str!("../migrations/postgres/0002_change_log_floor.sql"),
    },
    Migration {
        version: 3,
        name: "pepper_id",
        sql: include_str!("../migrations/postgres/0003_pepper_id.sql"),
    },
    Migration {
        version: 4,
        name: "account_scopes_and_secret_history",
        sql: include_str!("../migrations/postgres/0004_account_scopes_and_secret_history.sql"),
    },
    Migration {
        version: 5,
        name: AUDIT_CHAIN,
        sql: include_str!("../migrations/postgres/0005_audit_chain.sql"),
    },
    Migration {
        version: 6,
        name: "request_ids_and_versions",
        sql: include_str!("../migrations/postgres/0006_request_ids_and_versions.sql"),
    },
];

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
    /// Fills in the checksum of a row recorded without one.
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
    /// Newer than every applied version, in order.
    pub pending: Vec<&'a Migration>,
}

/// Checks the ledger against `list` and says what to do. A migration whose
/// recorded checksum differs from its file's is an error naming the file.
/// Versions this binary does not know (a newer one migrated) are left be.
pub(crate) fn plan<'a>(list: &'a [Migration], applied: &[Applied]) -> Result<Plan<'a>> {
    let mut unchecked = Vec::new();
    for row in applied {
        let Some(m) = list.iter().find(|m| m.version == row.version) else {
            continue;
        };
        match &row.checksum {
            None => unchecked.push(m),
            Some(recorded) if *recorded == m.checksum() => {}
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
    Ok(Plan { unchecked, pending })
}

/// Brings the ledger's database up to `list`; returns how many migrations
/// ran. The caller holds the transaction (and, on Postgres, the lock).
pub(crate) async fn run(ledger: &mut impl Ledger, list: &[Migration]) -> Result<usize> {
    ledger.prepare().await?;
    let plan = plan(list, &ledger.applied().await?)?;
    for m in &plan.unchecked {
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
                pending: vec![]
            }
        );
    }

    #[test]
    fn files_are_named_as_on_disk() {
        assert_eq!(SQLITE[0].file(), "0001_initial.sql");
        assert_eq!(SQLITE[0].checksum().len(), 64);
    }
}

//! The migration ledger on SQLite, in the writer's `BEGIN IMMEDIATE`
//! transaction: another process starting at the same time waits for it.

use std::collections::BTreeMap;

use rusqlite::params;

use super::audit::write_head;
use super::{Sqlite, complete, map_err};
use crate::chain::Head;
use crate::migrate::{self, Applied, CHAIN_BATCH, CREATE_LEDGER, ChainedEvent, Migration, SQLITE};
use crate::rows::{self, CHAIN_EVENT_COLUMNS};
use crate::{AuditChainRow, Result, StoredAuditEvent};

/// [`crate::Store::migrate`]. The runner is shared with Postgres and
/// async; nothing here waits, so it completes on this thread.
pub(super) fn migrate(tx: &mut Sqlite<'_>) -> Result<usize> {
    complete(migrate::run(&mut Ledger(tx), SQLITE))
}

struct Ledger<'a, 'c>(&'a Sqlite<'c>);

impl migrate::Ledger for Ledger<'_, '_> {
    async fn prepare(&mut self) -> Result<()> {
        self.0.execute(CREATE_LEDGER, []).map_err(map_err)?;
        // SQLite has no ADD COLUMN IF NOT EXISTS.
        let has_checksum: bool = self
            .0
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info('schema_migrations') \
                 WHERE name = 'checksum')",
                [],
                |r| r.get(0),
            )
            .map_err(map_err)?;
        if !has_checksum {
            self.0
                .execute("ALTER TABLE schema_migrations ADD COLUMN checksum TEXT", [])
                .map_err(map_err)?;
        }
        Ok(())
    }

    async fn applied(&mut self) -> Result<Vec<Applied>> {
        let mut stmt = self
            .0
            .prepare("SELECT version, checksum FROM schema_migrations ORDER BY version")
            .map_err(map_err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Applied {
                    version: r.get(0)?,
                    checksum: r.get(1)?,
                })
            })
            .map_err(map_err)?;
        rows.map(|r| r.map_err(map_err)).collect()
    }

    async fn record_checksum(&mut self, version: i64, checksum: &str) -> Result<()> {
        self.0
            .execute(
                "UPDATE schema_migrations SET checksum = ?1 WHERE version = ?2",
                params![checksum, version],
            )
            .map_err(map_err)?;
        Ok(())
    }

    async fn unchained_events(&mut self, after: i64) -> Result<Vec<StoredAuditEvent>> {
        let mut stmt = self
            .0
            .prepare(&format!(
                "{CHAIN_EVENT_COLUMNS} WHERE event_id > ?1 AND hash IS NULL \
                 ORDER BY event_id LIMIT ?2"
            ))
            .map_err(map_err)?;
        let mut found = stmt.query([after, CHAIN_BATCH]).map_err(map_err)?;
        let mut events = Vec::new();
        while let Some(row) = found.next().map_err(map_err)? {
            if let AuditChainRow::Event(event) = rows::chain_row(row)? {
                events.push(event);
            }
        }
        Ok(events)
    }

    async fn chain_events(&mut self, links: &[ChainedEvent]) -> Result<()> {
        let mut update = self
            .0
            .prepare_cached(
                "UPDATE audit_events SET account_seq = ?1, prev_hash = ?2, hash = ?3 \
                 WHERE event_id = ?4",
            )
            .map_err(map_err)?;
        for link in links {
            update
                .execute(params![
                    link.seq,
                    &link.prev_hash[..],
                    &link.hash[..],
                    link.row_id
                ])
                .map_err(map_err)?;
        }
        Ok(())
    }

    async fn write_heads(&mut self, heads: &BTreeMap<String, Head>) -> Result<()> {
        for (account, head) in heads {
            write_head(self.0, account, *head)?;
        }
        Ok(())
    }

    async fn apply(&mut self, m: &Migration, checksum: &str, at: &str) -> Result<()> {
        self.0
            .execute_batch(m.sql)
            .map_err(|e| migrate::failed(m, e))?;
        self.0
            .execute(
                "INSERT INTO schema_migrations (version, name, applied_at, checksum) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![m.version, m.name, at, checksum],
            )
            .map_err(map_err)?;
        Ok(())
    }
}
